"""The trainer: SIGKILL + resume equals an uninterrupted run, one pass for several configs equals
sequential runs, streamed data equals resident data; checkpoints and SAELens export round-trip."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medsae.sae.config import SAESpec
from medsae.sae.data import ArrayStore, TrainData
from medsae.sae.train import TrainJob, train_many

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n: int = 600, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(48, d))
    codes = rng.uniform(0.5, 1.5, size=(n, 3))
    idx = np.argsort(rng.random((n, 48)), axis=1)[:, :3]
    return (np.einsum("nk,nkd->nd", codes, atoms[idx]) + 0.5).astype(np.float32)


def _params(**kw) -> dict:
    base = dict(
        batch_size=64,
        epochs=3,
        lr=3e-3,
        warmup_steps=5,
        checkpoint_every=7,
        log_every=5,
        dead_after=256,
    )
    return SAESpec(**{**base, **kw}).model_dump(mode="json")


CONFIGS = {
    "topk_auxk": dict(arch="topk", d_sae=48, k=3, k_aux=6, grad_clip=1.0),
    "batchtopk_center": dict(
        arch="batchtopk",
        d_sae=40,
        k=3,
        normalize="center_scale",
        b_dec_init="geometric_median",
        threshold_warmup=10,
    ),
    "study": dict(
        preset="study",
        levels=[8, 16, 48],
        level_k=[2, 2, 4],
        batch_size=64,
        epochs=3,
        lr=3e-3,
        warmup_steps=5,
        grad_clip=0.5,
        shuffle="epoch",
    ),
    "relu_l1": dict(arch="relu_l1", d_sae=32, l1_coeff=1e-3, normalize="none"),
}


def _train(x: np.ndarray, specs: list[dict], work_dirs: list[Path | None] | None = None, chunk_rows=None, **kw):
    data = TrainData(ArrayStore(x), np.arange(len(x)), torch.device("cpu"), 1e9, chunk_rows=chunk_rows)
    work_dirs = work_dirs or [None] * len(specs)
    jobs = [TrainJob(p, seed=7, work_dir=w) for p, w in zip(specs, work_dirs, strict=True)]
    return train_many(jobs, data, torch.device("cpu"), **kw)


def _assert_same(a, b, exact: bool = True):
    for (name, ta), (_, tb) in zip(a.sae.state_dict().items(), b.sae.state_dict().items(), strict=True):
        if exact:
            assert torch.equal(ta, tb), name
        else:
            torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-7, msg=name)
    assert a.log == b.log
    assert a.history == b.history  # the training curve (history.json) survives a resume too
    for key in ("fvu", "l0_mean", "dead_fraction", "dense_fraction", "train_loss"):
        assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-6, nan_ok=True), key


_KILL_SCRIPT = """
import json, os, signal, sys
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from medsae.sae.data import ArrayStore, TrainData
from medsae.sae.train import TrainJob, train_many
x = np.load({x!r})
params = json.loads(open({params!r}).read())
data = TrainData(ArrayStore(x), np.arange(len(x)), torch.device("cpu"), 1e9)
jobs = [TrainJob(p, seed=7, work_dir=w) for p, w in zip(params, {work!r})]
def on_step(step):
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
train_many(jobs, data, torch.device("cpu"), on_step=on_step)
"""


def test_sigkill_resume_equals_uninterrupted(tmp_path: Path):
    x = _data()
    specs = [_params(**CONFIGS["topk_auxk"]), _params(**CONFIGS["study"])]
    reference = _train(x, specs)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "params.json").write_text(json.dumps(specs))
    work = [str(tmp_path / "w0"), str(tmp_path / "w1")]
    script = _KILL_SCRIPT.format(
        root=str(ROOT), x=str(tmp_path / "x.npy"), params=str(tmp_path / "params.json"), work=work, kill_at=18
    )
    env = {**os.environ, "MEDSAE_QUIET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / "w0" / "train_state.pt").is_file()
    resumed = _train(x, specs, [Path(w) for w in work])
    total = math.ceil(3 * math.ceil(600 / 64))
    for got, ref in zip(resumed, reference, strict=True):
        assert got.info["resumed_from"] == 14  # last checkpoint before the kill at step 18 (every 7 steps)
        assert got.info["steps"] == total
        _assert_same(got, ref)


def test_several_configs_in_one_pass_equal_sequential_runs():
    x = _data(seed=1)
    specs = [_params(**c) for c in CONFIGS.values()]
    together = _train(x, specs)
    for spec, joint in zip(specs, together, strict=True):
        alone = _train(x, [spec])[0]
        _assert_same(joint, alone)


def test_streamed_chunks_equal_resident_data():
    x = _data(seed=2)
    specs = [_params(**CONFIGS["topk_auxk"]), _params(**CONFIGS["batchtopk_center"])]
    resident = _train(x, specs)
    streamed = _train(x, specs, chunk_rows=3 * 64)
    for a, b in zip(resident, streamed, strict=True):
        _assert_same(a, b)


def test_configs_with_different_batch_sizes_cannot_share_a_pass():
    from medsae.errors import MedsaeError

    with pytest.raises(MedsaeError, match="must share"):
        _train(_data(n=100), [_params(batch_size=32), _params(batch_size=64)])


def test_final_statistics_match_numpy():
    x = _data(seed=3)
    result = _train(x, [_params(**CONFIGS["batchtopk_center"])])[0]
    sae = result.sae
    with torch.no_grad():
        xn = sae.normalize(torch.from_numpy(x)).double().numpy()
        codes = sae.encode(torch.from_numpy(xn).float()).double().numpy()
        x_hat = sae.decode(torch.from_numpy(codes).float()).double().numpy()
    fires = (np.abs(codes) > 1e-8).sum(0)
    fvu = np.sum((xn - x_hat) ** 2) / np.sum((xn - xn.mean(0)) ** 2)
    assert result.metrics["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert result.metrics["l0_mean"] == pytest.approx(fires.sum() / len(x), rel=1e-9)
    assert result.metrics["dead_fraction"] == pytest.approx(np.mean(fires == 0))
    assert result.metrics["dense_fraction"] == pytest.approx(np.mean(fires / len(x) > 0.1))
    assert sae.threshold_ready()  # the thresholded inference path was measured

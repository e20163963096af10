"""Checkpoints, SAELens export, CSR codes and the train/encode stages on real artifact folders.

The export command on a registered experiment is tested in ``test_export_saelens.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from planted import atom_sums  # sibling test module
from safetensors.numpy import load_file

from medsae.errors import MedsaeError, MissingInputError
from medsae.sae.checkpoint import export_saelens, load_sae, read_config, save_sae
from medsae.sae.codes import load_codes, write_codes
from medsae.sae.config import SAESpec
from medsae.sae.data import ArrayStore, TrainData
from medsae.sae.train import TrainJob, train_many

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _x(n: int = 400, d: int = 16, seed: int = 0) -> np.ndarray:
    return atom_sums(n, d, offset=1.0, seed=seed)


SPECS = {
    "study": dict(
        preset="study",
        levels=[8, 32],
        level_k=[2, 4],
        batch_size=50,
        epochs=4,
        lr=3e-3,
        warmup_steps=3,
        threshold_warmup=10,
    ),
    "batchtopk_center": dict(
        arch="batchtopk",
        d_sae=32,
        k=3,
        normalize="center_scale",
        threshold_warmup=10,
        batch_size=50,
        epochs=4,
        lr=3e-3,
    ),
    "topk_none": dict(arch="topk", d_sae=32, k=4, normalize="none", batch_size=50, epochs=4, lr=3e-3),
    "relu_l1": dict(arch="relu_l1", d_sae=24, l1_coeff=1e-3, batch_size=50, epochs=4, lr=3e-3),
}


def _trained(name: str, x: np.ndarray):
    data = TrainData(ArrayStore(x), np.arange(len(x)), torch.device("cpu"), 1e9)
    return train_many([TrainJob(SAESpec(**SPECS[name]), seed=1)], data, torch.device("cpu"))[0].sae


def _saelens_reference(folder: Path, x_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAELens' inference semantics, written from its documented formulas, on the exported files."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    x = x_raw.astype(np.float64)
    coeff = np.ones((len(x), 1))
    if cfg["normalize_activations"] == "constant_norm_rescale":
        coeff = np.sqrt(cfg["d_in"]) / np.linalg.norm(x, axis=1, keepdims=True)
    hidden = (x * coeff - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        idx = np.argsort(-hidden, axis=1)[:, : cfg["k"]]
        acts = np.zeros_like(hidden)
        np.put_along_axis(acts, idx, np.maximum(np.take_along_axis(hidden, idx, 1), 0), 1)
    elif cfg["architecture"] == "jumprelu":
        acts = np.maximum(hidden, 0) * (hidden > w["threshold"])
    else:
        assert cfg["architecture"] == "standard"
        acts = np.maximum(hidden, 0)
    return acts, (acts @ w["W_dec"] + w["b_dec"]) / coeff


@pytest.mark.parametrize("name", list(SPECS))
def test_save_load_and_saelens_export_compute_the_same_codes(name: str, tmp_path: Path):
    x = _x()
    sae = _trained(name, x)
    save_sae(sae, tmp_path / "train", extra={"note": "test"})
    loaded = load_sae(tmp_path / "train")
    xt = torch.from_numpy(x)
    with torch.no_grad():
        codes = sae.encode(sae.normalize(xt))
        assert torch.equal(loaded.encode(loaded.normalize(xt)), codes)
        x_hat_in = sae.decode(codes).double().numpy()
    assert read_config(tmp_path / "train")["medsae"]["note"] == "test"
    assert codes.count_nonzero() > 0

    out = export_saelens(tmp_path / "train", tmp_path / "saelens")
    acts, recon_raw = _saelens_reference(out, x)
    np.testing.assert_allclose(acts, codes.double().numpy(), atol=1e-5)
    # SAELens reconstructs in the raw space: undo medsae's input normalisation by hand
    if sae.cfg.normalize == "l2":
        expected_raw = x_hat_in * np.linalg.norm(x, axis=1, keepdims=True)
    elif sae.cfg.normalize == "center_scale":
        expected_raw = x_hat_in * float(sae.norm_scale) + sae.norm_mean.double().numpy()
    else:
        expected_raw = x_hat_in
    np.testing.assert_allclose(recon_raw, expected_raw, rtol=1e-4, atol=1e-5)


def test_study_export_uses_shifted_relu_as_standard(tmp_path: Path):
    sae = _trained("study", _x())
    save_sae(sae, tmp_path / "t")
    cfg = json.loads((export_saelens(tmp_path / "t", tmp_path / "s") / "cfg.json").read_text())
    assert cfg["architecture"] == "standard"
    assert cfg["normalize_activations"] == "constant_norm_rescale"
    assert float(sae.threshold) > 0


def test_load_sae_errors_are_one_line(tmp_path: Path):
    with pytest.raises(MissingInputError, match="cfg.json"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "topk"}))
    with pytest.raises(MedsaeError, match="no 'medsae' block"):
        load_sae(tmp_path)


def test_codes_round_trip(tmp_path: Path):
    rng = np.random.default_rng(0)
    dense = rng.random((30, 50)) * (rng.random((30, 50)) < 0.1)
    csr = sp.csr_matrix(dense.astype(np.float32))
    ids = np.arange(100, 130)
    write_codes(tmp_path, csr, ids)
    got, got_ids = load_codes(tmp_path)
    assert got.dtype == np.float32 and got.shape == (30, 50)
    np.testing.assert_array_equal(got.toarray(), dense.astype(np.float32))
    np.testing.assert_array_equal(got_ids, ids)
    assert json.loads((tmp_path / "meta.json").read_text()) == {"n": 30, "d_sae": 50, "nnz": csr.nnz}
    (tmp_path / "codes_values.npy").unlink()
    with pytest.raises(MissingInputError, match="codes_values.npy"):
        load_codes(tmp_path)


# -- stages on real artifact folders ----------------------------------------------------------


def _artifacts(tmp_path: Path, n: int = 300, d: int = 16) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    from medsae.embed.store import write_manifest, write_shard

    x = _x(n, d, seed=4)
    slices_dir, embed_dir = tmp_path / "slices", tmp_path / "embed"
    slices_dir.mkdir()
    embed_dir.mkdir()
    split = np.array(["train", "train", "val", "test", "train"])[np.arange(n) % 5]
    pd.DataFrame({"slice_id": np.arange(n, dtype=np.int64), "split": split}).to_parquet(slices_dir / "slices.parquet")
    order = np.random.default_rng(0).permutation(n)  # embed rows need not follow slice order
    shards = [write_shard(embed_dir, i, x[order[s : s + 128]]) for i, s in enumerate(range(0, n, 128))]
    write_manifest(embed_dir, shards=shards, slice_ids=order, d=d, dtype="float32", shard_size=128)
    return slices_dir, embed_dir, x, split


def _ctx(tmp_path: Path, kind: str, name: str, spec: SAESpec | None, inputs: dict):
    from medsae.stage import StageContext

    out = tmp_path / kind / name
    out.mkdir(parents=True)
    return StageContext(
        kind=kind,
        key=name,
        spec=spec,
        out_dir=out,
        work_dir=tmp_path / "work" / name,
        inputs=inputs,
        input_keys={},
        seed=0,
        experiment=name,
        quiet=True,
    )


def test_train_and_encode_stages(tmp_path: Path):
    pytest.importorskip("medsae.data.index")
    from medsae.sae.stage import run_encode, run_train, run_train_many

    slices_dir, embed_dir, x, split = _artifacts(tmp_path)
    inputs = {"slices": slices_dir, "embed": embed_dir}
    params = [SAESpec(**SPECS[n]) for n in ("batchtopk_center", "topk_none")]
    ctxs = [_ctx(tmp_path, "train", f"c{i}", p, inputs) for i, p in enumerate(params)]
    results = run_train_many(ctxs)
    assert [r.summary["configs_in_pass"] for r in results] == [2, 2]
    n_train = int((split == "train").sum())
    for r in results:
        metrics = {m.name: m for m in r.metrics}
        assert {"train_loss", "fvu", "l0_mean", "dead_fraction", "dense_fraction"} <= set(metrics)
        assert all(m.split == "train" and m.n == n_train for m in r.metrics)
    log = json.loads((ctxs[0].out_dir / "train_log.json").read_text())
    assert log["info"]["n_train"] == n_train and log["log"][-1]["step"] == log["info"]["steps"]
    # a single run of the same config gives the same SAE as the shared pass
    alone = run_train(_ctx(tmp_path, "train", "alone", params[0], inputs))
    assert alone.metrics[1].value == pytest.approx(results[0].metrics[1].value, rel=1e-6)

    enc = _ctx(tmp_path, "encode", "e0", None, {"train": ctxs[0].out_dir, "embed": embed_dir})
    summary = run_encode(enc).summary
    codes, slice_ids = load_codes(enc.out_dir)
    assert codes.shape == (len(x), 32) and summary["nnz"] == codes.nnz
    sae = load_sae(ctxs[0].out_dir)
    raw = torch.from_numpy(x[slice_ids])  # encode rows follow the embed rows
    with torch.no_grad():
        expected = sae.encode(sae.normalize(raw)).numpy()
    np.testing.assert_allclose(codes.toarray(), expected, atol=1e-6)

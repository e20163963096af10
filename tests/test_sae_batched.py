"""A sweep's encoder matmuls as one batched GEMM (the GPU path, forced here on the CPU) train the same SAEs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from planted import atom_sums  # sibling test module

from medsae.sae.config import SAESpec
from medsae.sae.data import ArrayStore, TrainData
from medsae.sae.train import TrainJob, _Run, batched_pre_acts, total_steps, train_many

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n: int = 320, d: int = 16, seed: int = 0) -> np.ndarray:
    return atom_sums(n, d, offset=0.5, seed=seed)


BASE = dict(batch_size=64, epochs=2, lr=3e-3, warmup_steps=3, dead_after=128, log_every=4)
# three configs share (d, 48 latents): one GEMM; the 32-latent one and the center_scale one stay alone
CONFIGS = [
    dict(arch="topk", d_sae=48, k=3, k_aux=6),
    dict(arch="batchtopk", d_sae=48, k=2, threshold_warmup=2),
    dict(arch="matryoshka", levels=[16, 48], level_k=[1, 3], auxk=False),
    dict(arch="topk", d_sae=32, k=2),
    dict(arch="topk", d_sae=48, k=4, normalize="center_scale"),
]


def test_batched_pre_activations_equal_each_runs_own_matmul():
    x = _data()
    data = TrainData(ArrayStore(x), np.arange(len(x)), torch.device("cpu"), 1e9)
    jobs = [TrainJob(SAESpec(**BASE, **c)) for c in CONFIGS]
    total = total_steps(data.n, jobs[0].spec)
    runs = [_Run(job, data, torch.device("cpu"), total, {}) for job in jobs]
    xb = torch.from_numpy(x[:64])
    inputs = {"l2": runs[0].sae.normalize(xb), "center_scale": runs[4].sae.normalize(xb)}
    z = batched_pre_acts(runs, inputs)
    assert set(z) == {id(r) for r in runs[:3]}  # groups of one are left to the run itself
    for run in runs[:3]:
        with torch.no_grad():  # the plain per-config matmul, in float64 as an independent reference
            sae = run.sae
            ref = (inputs["l2"].double() - sae.b_dec.double()) @ sae.W_enc.double().t() + sae.b_enc.double()
        torch.testing.assert_close(z[id(run)].double(), ref, rtol=1e-5, atol=1e-6)


def test_batched_encoder_trains_the_same_weights_as_per_config_matmuls():
    x = _data(seed=1)
    results = {}
    for batched in (False, True):
        data = TrainData(ArrayStore(x), np.arange(len(x)), torch.device("cpu"), 1e9)
        jobs = [TrainJob(SAESpec(**BASE, **c), seed=3) for c in CONFIGS]
        results[batched] = train_many(jobs, data, torch.device("cpu"), batched=batched)
    for plain, grouped in zip(results[False], results[True], strict=True):
        assert (plain.info["batched_encoder"], grouped.info["batched_encoder"]) == (False, True)
        for name, a in plain.sae.state_dict().items():
            torch.testing.assert_close(grouped.sae.state_dict()[name], a, rtol=1e-4, atol=1e-5, msg=name)
        assert grouped.metrics["fvu"] == pytest.approx(plain.metrics["fvu"], rel=1e-4)

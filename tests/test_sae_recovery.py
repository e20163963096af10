"""Planted-dictionary recovery: a TopK SAE finds known atoms, and AuxK revives dead latents.

Data: 256 random unit atoms in d = 64; every sample is 4 distinct atoms with coefficients
uniform in [0.5, 1.5], plus a constant offset of norm 2 (real embeddings are far from centred).
The SAE has as many latents as there are atoms and starts with b_dec = 0, so latents whose
encoder points away from the offset never win the top-k at first: the classic dead-latent
pathology. AuxK trains those latents on the residual until they take over atoms nobody covers.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from medsae.sae.config import SAESpec
from medsae.sae.data import ArrayStore, TrainData
from medsae.sae.train import TrainJob, train_many

D_IN, N_ATOMS, ACTIVE, N = 64, 256, 4, 8192


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(N_ATOMS, D_IN))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.argsort(rng.random((N, N_ATOMS)), axis=1)[:, :ACTIVE]
    coef = rng.uniform(0.5, 1.5, size=(N, ACTIVE))
    offset = rng.normal(size=D_IN)
    offset *= 2.0 / np.linalg.norm(offset)
    return atoms, (np.einsum("nk,nkd->nd", coef, atoms[idx]) + offset).astype(np.float32)


def _recovered(atoms: np.ndarray, decoder: np.ndarray) -> float:
    """Fraction of atoms whose best-matching decoder row has |cosine| > 0.9 (numpy)."""
    rows = decoder / np.linalg.norm(decoder, axis=1, keepdims=True)
    return float((np.abs(atoms @ rows.T).max(axis=1) > 0.9).mean())


def test_topk_recovers_planted_atoms_and_auxk_revives_dead_latents():
    atoms, x = _planted()
    data = TrainData(ArrayStore(x), np.arange(N), torch.device("cpu"), 1e9)
    common = dict(
        arch="topk",
        d_sae=N_ATOMS,
        k=ACTIVE,
        batch_size=256,
        epochs=80,
        lr=5e-3,
        warmup_steps=10,
        normalize="none",
        b_dec_init="zeros",
        dead_after=512,
        k_aux=32,
        log_every=10**6,
    )
    specs = [SAESpec(**common, auxk=True), SAESpec(**common, auxk=False)]
    os.environ.setdefault("MEDSAE_QUIET", "1")
    with_aux, without = train_many([TrainJob(s) for s in specs], data, torch.device("cpu"))
    rec_aux = _recovered(atoms, with_aux.sae.decoder_weight.detach().numpy())
    rec_plain = _recovered(atoms, without.sae.decoder_weight.detach().numpy())
    dead_aux, dead_plain = with_aux.metrics["dead_fraction"], without.metrics["dead_fraction"]
    print(
        f"\nplanted recovery (cos > 0.9): AuxK {rec_aux:.3f}, no AuxK {rec_plain:.3f}; "
        f"dataset-level dead fraction: AuxK {dead_aux:.3f}, no AuxK {dead_plain:.3f}; "
        f"FVU: AuxK {with_aux.metrics['fvu']:.3f}, no AuxK {without.metrics['fvu']:.3f}"
    )
    assert rec_aux >= 0.90
    assert dead_aux <= 0.10
    assert dead_plain > dead_aux + 0.03
    assert rec_aux > rec_plain

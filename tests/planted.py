"""Planted SAE training data for tests: each sample a sum of 3 random dictionary atoms plus an offset.

A sibling helper module (``from planted import atom_sums``), so the SAE tests share one generator.
"""

from __future__ import annotations

import numpy as np


def atom_sums(n: int, d: int, atoms: int = 40, offset: float = 0.5, seed: int = 0, unit: bool = False) -> np.ndarray:
    """``n`` samples in ``d`` dimensions: 3 of ``atoms`` Gaussian atoms (unit-norm with ``unit``), coefficients
    uniform in [0.5, 1.5], plus ``offset`` in every dimension; float32."""
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(atoms, d))
    if unit:
        dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n, atoms)), axis=1)[:, :3]
    return (np.einsum("nk,nkd->nd", rng.uniform(0.5, 1.5, (n, 3)), dictionary[idx]) + offset).astype(np.float32)

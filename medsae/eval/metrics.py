"""Reconstruction and sparsity metrics: one formula per function, the definition in its docstring.

Conventions: ``x`` is the SAE input (after the SAE's own input normalisation, e.g. per-sample L2 for
the study), ``x_hat`` the reconstruction in the same space, both ``[n, d]``. ``codes`` is a
``scipy.sparse.csr_matrix [n, d_sae]``. A latent *fires* on a sample when its activation is
``> FIRE_EPS`` (the study's alive threshold, 1e-8).

The study's reported numbers are reproduced next to the sound ones (docs/method.md#reconstruction and
docs/method.md#problem-27): its R² subtracts one scalar mean from the whole ``[2048, d]`` block (so it credits the
SAE for the per-dimension means, which inflates it) and its "alive" count is per 2,048-sample
batch, not per dataset. :func:`fvu` (per-dimension means) and :func:`dead_fraction` (never fires on
the whole split) are the sound versions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

#: Activation above which a latent counts as firing (the study's alive threshold).
FIRE_EPS = 1e-8
#: The study's validation batch size: its R² and alive counts are per batch of this many rows.
STUDY_BATCH = 2048
#: A latent is "dense" when it fires on more than this fraction of a split's samples.
DENSE_THRESHOLD = 0.1
#: Quantiles reported for the L0 distribution.
L0_QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


# -- reconstruction --------------------------------------------------------------------------------


def mse(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Mean squared error over all entries: ``mean_{i,j} (x_ij - x̂_ij)²``."""
    diff = _f64(x) - _f64(x_hat)
    return float(np.mean(diff * diff))


def fvu_from_sums(sse: float, sst: float) -> float:
    """``FVU = SSE / SST`` (NaN when the data has no variance)."""
    return float(sse / sst) if sst > 0 else float("nan")


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Fraction of variance unexplained with a per-dimension mean (the sound reconstruction metric).

    ``FVU = Σ_{i,j} (x_ij - x̂_ij)² / Σ_{i,j} (x_ij - μ_j)²`` with ``μ_j = mean_i x_ij``: the
    reconstruction error relative to the error of predicting every sample by the data mean. 0 is
    perfect, 1 is no better than the mean. ``1 - FVU`` is :func:`variance_explained`.
    """
    x = _f64(x)
    diff = x - _f64(x_hat)
    centred = x - x.mean(axis=0, keepdims=True)
    return fvu_from_sums(float(np.sum(diff * diff)), float(np.sum(centred * centred)))


def variance_explained(x: np.ndarray, x_hat: np.ndarray) -> float:
    """``1 - FVU`` (per-dimension means): the usual R² of a multi-output regression, pooled."""
    return 1.0 - fvu(x, x_hat)


def r2_scalar_mean(x: np.ndarray, x_hat: np.ndarray) -> float:
    """R² of one block with ONE scalar mean (the study's per-batch formula, docs/method.md#reconstruction).

    ``R² = 1 - Σ_{b,j} (x_bj - x̂_bj)² / Σ_{b,j} (x_bj - m)²`` with ``m = mean_{b,j} x_bj`` the mean
    of all entries. Because ``Σ (x - m)² >= Σ (x - μ_j)²``, this is never smaller than
    ``1 - FVU`` of the same block and much larger when the dimensions have different means.
    """
    x = _f64(x)
    diff = x - _f64(x_hat)
    centred = x - x.mean()
    sst = float(np.sum(centred * centred))
    return 1.0 - float(np.sum(diff * diff)) / sst if sst > 0 else float("nan")


def r2_scalar_mean_study(x: np.ndarray, x_hat: np.ndarray, batch: int = STUDY_BATCH) -> float:
    """The study's reported R²: :func:`r2_scalar_mean` per batch of ``batch`` consecutive rows,
    averaged over batches weighted by batch size (how Lightning reduces a logged value over the
    validation epoch). Rows are in slice order (the study's unshuffled val loader).
    """
    n = len(x)
    values, weights = [], []
    for start in range(0, n, batch):
        values.append(r2_scalar_mean(x[start : start + batch], x_hat[start : start + batch]))
        weights.append(min(batch, n - start))
    return _weighted_mean(values, weights)


def _weighted_mean(values: list[float], weights: list[int]) -> float:
    v, w = np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    ok = np.isfinite(v)
    return float(np.sum(v[ok] * w[ok]) / np.sum(w[ok])) if ok.any() else float("nan")


def cosine_similarities(x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    """Per-sample cosine ``<x_i, x̂_i> / (‖x_i‖ ‖x̂_i‖)``; 0 where either vector is zero."""
    x, x_hat = _f64(x), _f64(x_hat)
    dot = np.einsum("ij,ij->i", x, x_hat)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1)
    return np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)


def cosine_similarity_mean(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Mean over samples of :func:`cosine_similarities`."""
    return float(np.mean(cosine_similarities(x, x_hat)))


@dataclass
class ReconstructionStats:
    """Streaming version of the reconstruction metrics for data that does not fit in memory.

    Feed ``update(x, x_hat)`` chunks in row order; every chunk except the last must hold a multiple
    of ``batch`` rows so the study's per-batch R² sees the same batches as :func:`r2_scalar_mean_study`.
    Per-dimension means and sums of squares are merged with Chan's parallel formula (no
    cancellation from ``Σx² - n·mean²``). The results equal the whole-array functions.
    """

    batch: int = STUDY_BATCH
    n: int = 0
    sse: float = 0.0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None  # per-dimension Σ (x - mean)²
    cos_sum: float = 0.0
    d: int = 0
    _r2_values: list[float] = field(default_factory=list)
    _r2_weights: list[int] = field(default_factory=list)
    _ragged: bool = False

    def update(self, x: np.ndarray, x_hat: np.ndarray) -> None:
        """Add a chunk of rows."""
        if self._ragged:
            raise ValueError(f"only the last chunk may hold a number of rows that is not a multiple of {self.batch}")
        x, x_hat = _f64(x), _f64(x_hat)
        m = len(x)
        if m == 0:
            return
        self._ragged = m % self.batch != 0
        diff = x - x_hat
        self.sse += float(np.sum(diff * diff))
        self.cos_sum += float(np.sum(cosine_similarities(x, x_hat)))
        chunk_mean = x.mean(axis=0)
        chunk_m2 = np.sum((x - chunk_mean) ** 2, axis=0)
        if self.mean is None:
            self.mean, self.m2, self.d = chunk_mean, chunk_m2, x.shape[1]
        else:
            total = self.n + m
            delta = chunk_mean - self.mean
            self.m2 = self.m2 + chunk_m2 + delta * delta * (self.n * m / total)
            self.mean = self.mean + delta * (m / total)
        self.n += m
        for start in range(0, m, self.batch):
            self._r2_values.append(r2_scalar_mean(x[start : start + self.batch], x_hat[start : start + self.batch]))
            self._r2_weights.append(min(self.batch, m - start))

    def result(self) -> dict[str, float]:
        """``fvu``, ``variance_explained``, ``r2_scalar_mean_study``, ``mse``, ``cosine_sim``."""
        if self.n == 0:
            nan = float("nan")
            return dict(fvu=nan, variance_explained=nan, r2_scalar_mean_study=nan, mse=nan, cosine_sim=nan)
        value = fvu_from_sums(self.sse, float(np.sum(self.m2)))
        return dict(
            fvu=value,
            variance_explained=1.0 - value,
            r2_scalar_mean_study=_weighted_mean(self._r2_values, self._r2_weights),
            mse=self.sse / (self.n * self.d),
            cosine_sim=self.cos_sum / self.n,
        )


# -- sparsity --------------------------------------------------------------------------------------


def _fires(codes: sp.csr_matrix) -> np.ndarray:
    return np.abs(codes.data) > FIRE_EPS


def l0_per_sample(codes: sp.csr_matrix) -> np.ndarray:
    """``L0_i = #{j : |a_ij| > FIRE_EPS}``, the number of firing latents of each sample."""
    codes = sp.csr_matrix(codes)
    fires = _fires(codes).astype(np.int64)
    row = np.repeat(np.arange(codes.shape[0]), np.diff(codes.indptr))
    return np.bincount(row, weights=fires, minlength=codes.shape[0]).astype(np.int64)


def l0_summary(l0: np.ndarray, quantiles: tuple[float, ...] = L0_QUANTILES) -> dict[str, float]:
    """Mean, standard deviation, min, max and quantiles (``numpy.quantile``, linear) of the L0s.

    Keys: ``l0_mean``, ``l0_std``, ``l0_min``, ``l0_max``, ``l0_p1`` ... ``l0_p99``. The study
    reports only the mean (``L0 = mean_b #{j : a_bj ≠ 0}``, docs/method.md#sparsity); the spread shows whether a
    BatchTopK threshold gives some samples many more latents than others.
    """
    l0 = np.asarray(l0, dtype=np.float64)
    if l0.size == 0:
        return {"l0_mean": float("nan")}
    out = {
        "l0_mean": float(l0.mean()),
        "l0_std": float(l0.std()),
        "l0_min": float(l0.min()),
        "l0_max": float(l0.max()),
    }
    for q, v in zip(quantiles, np.quantile(l0, quantiles), strict=True):
        out[f"l0_p{round(q * 100):d}"] = float(v)
    return out


def latent_fire_counts(codes: sp.csr_matrix) -> np.ndarray:
    """``c_j = #{i : |a_ij| > FIRE_EPS}``, the number of samples each latent fires on."""
    codes = sp.csr_matrix(codes)
    return np.bincount(codes.indices[_fires(codes)], minlength=codes.shape[1]).astype(np.int64)


def latent_frequencies(codes: sp.csr_matrix) -> np.ndarray:
    """``f_j = c_j / n``: the fraction of samples each latent fires on."""
    return latent_fire_counts(codes) / max(codes.shape[0], 1)


def dead_fraction(fire_counts: np.ndarray) -> float:
    """Dataset-level dead fraction: ``mean_j [c_j = 0]``, latents that never fire on the split."""
    return float(np.mean(np.asarray(fire_counts) == 0))


def dense_fraction(fire_counts: np.ndarray, n_samples: int, threshold: float = DENSE_THRESHOLD) -> float:
    """Dense fraction: ``mean_j [c_j / n > threshold]``, latents firing on more than 10 % of samples."""
    return float(np.mean(np.asarray(fire_counts) / max(n_samples, 1) > threshold))


def alive_per_batch_study(codes: sp.csr_matrix, batch: int = STUDY_BATCH) -> float:
    """The study's alive count (docs/method.md#latent-usage): per batch of ``batch`` consecutive rows,
    ``alive = #{j : max_b a_bj > 1e-8}``; the value is the batch-size-weighted mean over batches.

    This is *not* a dead-latent measure: a latent alive in one batch in ten counts in that batch
    only, and a latent that never fires anywhere cannot be told apart from one that fires rarely.
    """
    codes = sp.csr_matrix(codes)
    n = codes.shape[0]
    if n == 0:
        return float("nan")
    positive = codes.data > FIRE_EPS
    row = np.repeat(np.arange(n), np.diff(codes.indptr))[positive]
    batch_id = row // batch
    pairs = np.unique(batch_id * codes.shape[1] + codes.indices[positive].astype(np.int64))
    n_batches = (n + batch - 1) // batch
    alive = np.bincount(pairs // codes.shape[1], minlength=n_batches).astype(np.float64)
    sizes = np.minimum(batch, n - np.arange(n_batches) * batch).astype(np.float64)
    return float(np.sum(alive * sizes) / np.sum(sizes))

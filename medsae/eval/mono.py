"""The study's monosemanticity score (docs/method.md#monosemanticity): do a latent's top slices share anatomy?

Per latent ``f`` (on one split's codes; the study uses val):

1. Latents firing on every slice are excluded (non-discriminative).
2. Top-activating slices: slices in descending activation, keeping only the first (strongest)
   slice per scan, positive activations only, at most 50. Latents with fewer than 10 are excluded.
3. For N in {10, 50}, ``O_1..O_N`` are the structure-presence sets of the top-N slices.
4. Coherence: mean pairwise Jaccard ``|O_i ∩ O_j| / |O_i ∪ O_j|`` over the N(N-1)/2 pairs
   (1 when both sets are empty) - :func:`mean_pairwise_jaccard`.
5. Null baseline: the mean of the same statistic over 100 random draws of N slices of the split
   (without replacement) - :func:`null_coherence`.
6. ``C_N = max(0, coherence - null_N)``.
7. Specificity ``S_N = 1 - H / ln V`` with ``H`` the entropy of the structure counts over the
   top-N slices and ``V`` the vocabulary size (0 when no structure occurs) - :func:`specificity`.
8. ``M_N = C_N · S_N``; ``M_50`` only for latents with at least 50 slices.

Configuration scores (:func:`config_scores`): ``mono_config_top10`` = mean of the 10 largest
``M_10`` (the study's public code), ``monosemanticity_top50_mean`` = mean of the 50 largest ``M_10``
(the value the study's shipped ranking used).

Deviation: "one slice per scan" keys on the scan (modality, image_id) the caller passes; the study
keyed on ``image_id`` alone, which CT and MRI reuse (docs/method.md#problem-24).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from medsae.eval.metrics import FIRE_EPS

TOP_NS = (10, 50)
MIN_IMAGES = 10
NULL_DRAWS = 100


def mean_pairwise_jaccard(sets: np.ndarray) -> np.ndarray:
    """``sets [..., N, V]`` (0/1) -> mean Jaccard over the N(N-1)/2 pairs, shape ``[...]``.

    ``J(i, j) = |O_i ∧ O_j| / |O_i ∨ O_j|``, ``J = 1`` when both are empty.
    """
    p = np.asarray(sets, dtype=np.float32)
    n = p.shape[-2]
    if n < 2:
        return np.full(p.shape[:-2], np.nan)
    inter = p @ np.swapaxes(p, -1, -2)
    size = p.sum(axis=-1)
    union = size[..., :, None] + size[..., None, :] - inter
    jac = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
    return (jac.sum(axis=(-1, -2)) - n) / (n * (n - 1))  # J_ii = 1 on the diagonal


def specificity(sets: np.ndarray, vocab_size: int) -> np.ndarray:
    """``S = 1 - H / ln V``: ``c_o`` = number of the N sets containing structure ``o``,
    ``p_o = c_o / Σ c``, ``H = -Σ_{p_o>0} p_o ln p_o``; 0 when no structure occurs."""
    c = np.asarray(sets, dtype=np.float64).sum(axis=-2)
    total = c.sum(axis=-1, keepdims=True)
    p = np.divide(c, total, out=np.zeros_like(c), where=total > 0)
    h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    s = 1.0 - h / np.log(vocab_size)
    return np.where(total[..., 0] > 0, s, 0.0)


def null_coherence(presence: np.ndarray, n_top: int, draws: int = NULL_DRAWS, seed: int = 42) -> float:
    """Mean of :func:`mean_pairwise_jaccard` over ``draws`` random sets of ``n_top`` rows of
    ``presence`` (drawn without replacement within a set)."""
    rng = np.random.default_rng(seed)
    n = presence.shape[0]
    if n < n_top:
        return float("nan")
    idx = np.stack([rng.choice(n, size=n_top, replace=False) for _ in range(draws)])
    return float(mean_pairwise_jaccard(presence[idx]).mean())


def top_slices_per_latent(codes: sp.spmatrix, scan: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``top`` slices of each latent by descending activation, one per scan.

    Returns ``rows [d_sae, top]`` (-1 where a latent has fewer) and ``n_found [d_sae]``.
    Ties in activation are broken by row order.
    """
    csc = sp.csc_matrix(codes)
    d = csc.shape[1]
    latent = np.repeat(np.arange(d), np.diff(csc.indptr))
    row, act = csc.indices.astype(np.int64), csc.data
    pos = act > FIRE_EPS
    latent, row, act = latent[pos], row[pos], act[pos]
    order = np.lexsort((row, -act, latent))
    latent, row = latent[order], row[order]
    scan_codes = np.unique(scan, return_inverse=True)[1].astype(np.int64)
    key = latent * (scan_codes.max() + 1 if len(scan_codes) else 1) + scan_codes[row]
    _, first = np.unique(key, return_index=True)  # first occurrence = strongest slice of the scan
    first = np.sort(first)
    latent, row = latent[first], row[first]
    starts = np.searchsorted(latent, np.arange(d))
    rank = np.arange(len(latent)) - starts[latent]
    keep = rank < top
    rows = np.full((d, top), -1, dtype=np.int64)
    rows[latent[keep], rank[keep]] = row[keep]
    return rows, np.minimum(np.bincount(latent, minlength=d), top)


@dataclass
class MonoSettings:
    top_ns: tuple[int, ...] = TOP_NS
    min_images: int = MIN_IMAGES
    null_draws: int = NULL_DRAWS
    seed: int = 42
    chunk: int = 512


def latent_scores(
    codes: sp.spmatrix,
    presence: sp.spmatrix | np.ndarray,
    scan: np.ndarray,
    settings: MonoSettings | None = None,
) -> tuple[pd.DataFrame, dict[int, float]]:
    """Per-latent coherence, specificity and monosemanticity for each N, and the null baselines.

    Returns a frame with one row per scored latent (columns ``latent, n_active, n_retrieved,
    coherence_N, null_N, specificity_N, mono_N`` for N in ``top_ns``) and ``{N: null mean}``.
    """
    s = settings or MonoSettings()
    codes = sp.csr_matrix(codes)
    n, d = codes.shape
    pres = presence.toarray() if sp.issparse(presence) else np.asarray(presence)
    pres = pres > 0
    vocab_size = pres.shape[1]
    n_active = np.bincount(codes.indices[codes.data > FIRE_EPS], minlength=d)
    rows, n_found = top_slices_per_latent(codes, scan, max(s.top_ns))
    scored = np.flatnonzero((n_active < n) & (n_found >= s.min_images))
    frame = pd.DataFrame({"latent": scored, "n_active": n_active[scored], "n_retrieved": n_found[scored]})
    nulls = {}
    for top in s.top_ns:
        nulls[top] = null_coherence(pres, top, s.null_draws, s.seed)
        coh = np.full(len(scored), np.nan)
        spec = np.full(len(scored), np.nan)
        have = np.flatnonzero(n_found[scored] >= top)
        for start in range(0, len(have), s.chunk):
            part = have[start : start + s.chunk]
            sets = pres[rows[scored[part], :top]]  # [F, top, V]
            coh[part] = mean_pairwise_jaccard(sets)
            spec[part] = specificity(sets, vocab_size)
        frame[f"coherence_{top}"] = coh
        frame[f"specificity_{top}"] = spec
        frame[f"mono_{top}"] = np.maximum(0.0, coh - nulls[top]) * spec
    return frame, nulls


def config_scores(frame: pd.DataFrame, nulls: dict[int, float], base: int = 10) -> dict[str, float]:
    """Configuration-level aggregates of :func:`latent_scores` (the study's ``config_scores_all``).

    * ``mono_config_top10``: mean of the 10 largest ``M_10`` (the study's ``M_config``);
    * ``monosemanticity_top50_mean``: mean of the 50 largest ``M_10`` (used by the shipped ranking);
    * ``coherence_score``: mean over scored latents of ``max(0, coherence_10 - null_10)``;
    * ``specificity_score``: mean ``S_10``; ``breadth_score``: mean ``M_50 / M_10`` over latents
      with both (and ``M_10 > 0``);
    * ``n_features_scored``, ``n_features_above_null`` (coherence_10 > null_10).
    """
    m = frame.get(f"mono_{base}", pd.Series(dtype=float)).dropna()
    coh = frame.get(f"coherence_{base}", pd.Series(dtype=float)).dropna()
    out = {
        "mono_config_top10": float(m.nlargest(10).mean()) if len(m) else float("nan"),
        "monosemanticity_top50_mean": float(m.nlargest(50).mean()) if len(m) else float("nan"),
        "coherence_score": float(np.maximum(0.0, coh - nulls.get(base, np.nan)).mean()) if len(coh) else float("nan"),
        "specificity_score": float(frame[f"specificity_{base}"].mean()) if len(frame) else float("nan"),
        "n_features_scored": float(len(frame)),
        "n_features_above_null": float((coh > nulls.get(base, np.nan)).sum()),
    }
    if "mono_50" in frame and len(frame):
        both = frame[(frame["mono_50"].notna()) & (frame[f"mono_{base}"] > 0)]
        out["breadth_score"] = float((both["mono_50"] / both[f"mono_{base}"]).mean()) if len(both) else float("nan")
    for top, value in nulls.items():
        out[f"mono_null_{top}"] = value
    return out

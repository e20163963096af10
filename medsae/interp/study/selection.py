"""Which latents the study explains, and which latents serve as their ranking distractors.

**Selection** (the study's ``top_n`` mode, docs/method.md#interpret-study-protocol), from the evaluate stage's
per-latent monosemanticity on val and its per-target probe coefficient tables (top 100 each):

1. Monosemanticity rank: the scored latents by ``mono_50`` descending (latents without one last),
   rank = position 1, 2, ...
2. Coefficient rank: per latent the mean of its ranks over every table it appears in
   (``avg_coeff_rank``); latents by that mean ascending, rank = position.
3. Outer join; a missing rank becomes the largest rank of either column + 1;
   ``combined_rank`` = the mean of the two ranks; latents by it ascending.
4. Always-active latents (firing on every val slice) are removed; the first ``n`` are explained.

Ties keep the lower latent index first in every sort (the study's pandas sorts leave tied rows in an
order its sorting algorithm picks).

**Distractors** (the study's ``sample_distractor_features``): 4 latents drawn without replacement
among latents that are not the target, not always-active and fire (> 0) on at least 10 train
slices. The study drew them unseeded (``random.sample``); medsae draws from a generator seeded by
(seed, SAE key, target latent), so a rerun draws the same ones.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pandas as pd
import scipy.sparse as sp

from medsae.interp.sampling import purpose_rng

N_DISTRACTORS = 4
#: A distractor fires on at least this many train slices (the study's ``EVAL_MIN_ACTIVATIONS``).
DISTRACTOR_MIN_ACTIVE = 10

SELECTION_COLUMNS = [
    "latent",
    "order",
    "monosem_rank",
    "mono_50",
    "coeff_rank",
    "avg_coeff_rank",
    "combined_rank",
]


def _positions(frame: pd.DataFrame, by: str, ascending: bool) -> pd.DataFrame:
    """``frame`` sorted by ``by`` (missing last, ties by latent), with a 1-based ``position`` column."""
    ordered = frame.sort_values("latent", kind="stable").sort_values(
        by, ascending=ascending, na_position="last", kind="stable"
    )
    return ordered.assign(position=np.arange(1, len(ordered) + 1, dtype=np.int64))


def combined_ranking(mono: pd.DataFrame, coefficients: pd.DataFrame) -> pd.DataFrame:
    """Every latent of either table with its two ranks and ``combined_rank``, best first.

    ``mono``: columns ``latent, mono_50`` (one row per scored latent); ``coefficients``: columns
    ``table, rank, latent`` (the rows of every per-target coefficient table).
    """
    m = _positions(mono[["latent", "mono_50"]].astype({"latent": np.int64}), "mono_50", ascending=False)
    m = m.rename(columns={"position": "monosem_rank"})
    avg = coefficients.astype({"latent": np.int64}).groupby("latent", as_index=False)["rank"].mean()
    c = _positions(avg.rename(columns={"rank": "avg_coeff_rank"}), "avg_coeff_rank", ascending=True)
    c = c.rename(columns={"position": "coeff_rank"})
    both = m.merge(c, on="latent", how="outer")
    if both.empty:
        return pd.DataFrame(columns=SELECTION_COLUMNS[:1] + SELECTION_COLUMNS[2:])
    fill = float(np.nanmax(both[["monosem_rank", "coeff_rank"]].to_numpy(dtype=np.float64))) + 1
    both["monosem_rank"] = both["monosem_rank"].astype(np.float64).fillna(fill)
    both["coeff_rank"] = both["coeff_rank"].astype(np.float64).fillna(fill)
    both["combined_rank"] = (both["monosem_rank"] + both["coeff_rank"]) / 2
    both = both.sort_values("latent", kind="stable").sort_values("combined_rank", kind="stable")
    return both[["latent", "monosem_rank", "mono_50", "coeff_rank", "avg_coeff_rank", "combined_rank"]]


def select_latents(
    mono: pd.DataFrame, coefficients: pd.DataFrame, always_active: Collection[int], n: int
) -> pd.DataFrame:
    """The study's ``n`` latents to explain, best first (columns :data:`SELECTION_COLUMNS`)."""
    ranked = combined_ranking(mono, coefficients)
    ranked = ranked[~ranked["latent"].isin([int(x) for x in always_active])].head(int(n)).copy()
    ranked.insert(1, "order", np.arange(1, len(ranked) + 1, dtype=np.int64))
    return ranked.reset_index(drop=True)[SELECTION_COLUMNS]


def firing_counts(codes: sp.spmatrix) -> np.ndarray:
    """Per latent: the number of rows where it is > 0."""
    csr = sp.csr_matrix(codes)
    return np.bincount(csr.indices[csr.data > 0], minlength=csr.shape[1]).astype(np.int64)


def always_active(codes: sp.spmatrix) -> np.ndarray:
    """Latents > 0 on every row of ``codes`` (the study: minimum over val > 0), sorted; none if no row."""
    n = codes.shape[0]
    return np.flatnonzero(firing_counts(codes) == n) if n else np.zeros(0, dtype=np.int64)


def distractor_pool(
    train_counts: np.ndarray, always_active_latents: Collection[int], min_active: int = DISTRACTOR_MIN_ACTIVE
) -> np.ndarray:
    """Latents fit to be distractors: > 0 on at least ``min_active`` train slices, not always-active (sorted)."""
    eligible = np.asarray(train_counts) >= int(min_active)
    eligible[np.asarray(list(always_active_latents), dtype=np.int64)] = False
    return np.flatnonzero(eligible)


def draw_distractors(target: int, pool: np.ndarray, seed: int, sae_key: str, k: int = N_DISTRACTORS) -> list[int]:
    """``k`` latents of ``pool`` other than ``target``, drawn without replacement (seeded per target), in
    draw order; empty when fewer than ``k`` are eligible (the study then skips the ranking)."""
    others = np.asarray(pool, dtype=np.int64)
    others = others[others != int(target)]
    if len(others) < k:
        return []
    rng = purpose_rng(seed, sae_key, int(target), "study-distractors")
    return [int(x) for x in rng.choice(others, size=k, replace=False)]

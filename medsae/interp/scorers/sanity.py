"""Scorer sanity: is a score about the explanation at all?

A simulator that ignores the explanation still produces numbers, and a weak model does exactly
that: it answers every batch with the same pattern of values by slot (``X01: 5, X02: 3, ...``),
or gives the real and the shuffled explanation the same predictions. Such a score is marked
``degenerate`` (stored with the score, left out of headline means) when

* **position**: the slot within the batch explains at least ``POSITION_R2`` of the variance of
  the predictions, over at least ``MIN_BATCHES`` full batches (slices are shuffled before they
  are batched, so a faithful simulator's predictions do not follow the slot), or
* **identical**: two different explanations of the same example set, simulated on the same
  batches, got identical, non-constant prediction vectors.

:func:`scorer_gaps` answers the other question — can this scorer tell a real explanation from a
shuffled one? — per (scorer, explainer) from the stored scores: the mean paired difference of
pearson r (real minus shuffled) over latents with both, a seeded bootstrap 95 % interval over
latents, and a sentence that says so plainly when the interval reaches zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

POSITION_R2 = 0.9
MIN_BATCHES = 3
MIN_GAP_LATENTS = 3
GAP_BOOTSTRAP = 2000


def position_r2(values: np.ndarray, batch_positions: Sequence[np.ndarray]) -> float | None:
    """Share of the variance of the predictions explained by their slot in the batch.

    Only full batches (the most common, largest size) count; None with fewer than
    ``MIN_BATCHES`` of them or constant predictions.
    """
    values = np.asarray(values, dtype=float)
    if not batch_positions:
        return None
    size = max(len(p) for p in batch_positions)
    rows = [values[np.asarray(p)] for p in batch_positions if len(p) == size]
    if len(rows) < MIN_BATCHES or size < 2:
        return None
    grid = np.vstack(rows)
    finite = np.isfinite(grid)
    flat = grid[finite]
    if len(flat) < 3 or np.ptp(flat) == 0:
        return None
    total = float(((flat - flat.mean()) ** 2).sum())
    counts = finite.sum(axis=0)
    sums = np.where(finite, grid, 0.0).sum(axis=0)
    slot_mean = np.divide(sums, counts, out=np.zeros(size), where=counts > 0)
    residual = float((np.where(finite, grid - slot_mean, 0.0) ** 2).sum())
    return 1.0 - residual / total


def identical_predictions(a: np.ndarray, b: np.ndarray) -> bool:
    """Same finite, non-constant prediction vector (missing in the same places)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or not np.array_equal(a, b, equal_nan=True):
        return False
    finite = a[np.isfinite(a)]
    return len(finite) >= 3 and np.ptp(finite) > 0


def degenerate_reason(
    values: np.ndarray,
    batch_positions: Sequence[np.ndarray],
    twin: np.ndarray | None = None,
) -> tuple[str | None, float | None]:
    """(reason or None, slot R²) for one job's predictions; ``twin``: another explanation's on the same batches."""
    r2 = position_r2(values, batch_positions)
    if r2 is not None and r2 >= POSITION_R2:
        return f"predictions follow the slot in the batch (R² {r2:.2f})", r2
    if twin is not None and identical_predictions(values, twin):
        return "identical predictions for a different explanation of the same slices", r2
    return None, r2


# --------------------------------------------------------------------------- real vs shuffled


def _bootstrap_mean_ci(diffs: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diffs), size=(n_boot, len(diffs)))
    means = diffs[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def scorer_gaps(scores: pd.DataFrame, method: str = "pearson", seed: int = 0) -> list[dict[str, Any]]:
    """Real-vs-shuffled gap per (scorer, mode, explainer) from score rows.

    ``scores`` needs columns latent, explainer_model, kind, scorer_model, scorer_mode, method,
    value and (optionally) degenerate. Several versions of one latent are averaged first.
    """
    if scores.empty:
        return []
    s = scores[scores["method"] == method].copy()
    if "degenerate" not in s:
        s["degenerate"] = False
    s["degenerate"] = s["degenerate"].fillna(False).astype(bool)
    s["scorer_mode"] = s["scorer_mode"].fillna("")
    out = []
    keys = ["scorer_model", "scorer_mode", "explainer_model"]
    for (scorer, mode, explainer), group in s.groupby(keys, sort=True, dropna=False):
        real = group[group["kind"] == "explanation"]
        shuffled = group[group["kind"] == "shuffled"]
        if real.empty or shuffled.empty:
            continue
        a = real.dropna(subset=["value"]).groupby("latent")["value"].mean()
        b = shuffled.dropna(subset=["value"]).groupby("latent")["value"].mean()
        both = a.index.intersection(b.index)
        diffs = (a.loc[both] - b.loc[both]).to_numpy(dtype=float)
        n_deg = int(group["degenerate"].sum())
        row: dict[str, Any] = {
            "scorer": scorer,
            "mode": mode or None,
            "explainer": explainer,
            "method": method,
            "n_latents": int(len(diffs)),
            "gap": float(diffs.mean()) if len(diffs) else None,
            "ci_low": None,
            "ci_high": None,
            "n_scores": int(len(group)),
            "n_degenerate": n_deg,
        }
        if len(diffs) >= 2:
            row["ci_low"], row["ci_high"] = _bootstrap_mean_ci(diffs, GAP_BOOTSTRAP, seed)
        row["tells_apart"] = bool(len(diffs) >= MIN_GAP_LATENTS and row["ci_low"] is not None and row["ci_low"] > 0)
        row["words"] = gap_words(row)
        out.append(row)
    return out


def gap_words(row: dict[str, Any]) -> str:
    """One sentence about a :func:`scorer_gaps` row."""
    who = f"scorer {row['scorer']}" + (f" ({row['mode']})" if row.get("mode") else "")
    on = f" on {row['explainer']}'s explanations"
    degenerate = (
        f"; {row['n_degenerate']} of {row['n_scores']} scores are degenerate (the predictions do not "
        "depend on the explanation)"
        if row["n_degenerate"]
        else ""
    )
    if row["gap"] is None:
        return f"{who}{on}: no latent has both a real and a shuffled {row['method']} score{degenerate}"
    interval = f", 95% CI {row['ci_low']:+.2f} to {row['ci_high']:+.2f}" if row["ci_low"] is not None else ""
    figures = f"real − shuffled {row['method']} {row['gap']:+.2f}{interval}, {row['n_latents']} latents"
    if row["tells_apart"]:
        return f"{who}{on}: {figures}{degenerate}"
    if row["n_latents"] < MIN_GAP_LATENTS:
        return f"{who}{on}: too few latents to tell real from shuffled explanations ({figures}){degenerate}"
    return (
        f"{who} cannot tell a real explanation from a shuffled one{on} ({figures}): its scores mean little{degenerate}"
    )

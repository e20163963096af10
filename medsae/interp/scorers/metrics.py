"""Scores of simulated against true activations (docs/method.md#scoring), each with n, chance level and uncertainty.

* ``pearson`` (the headline): Pearson r between predictions and the raw true activations over
  the held-out simulation set; seeded bootstrap 95 % interval; one-sided permutation p-value.
* ``spearman``: rank correlation; ``auroc``: predictions as scores for firing (a > 0) vs not.
* ``detection_bacc`` / ``detection_auroc`` on the balanced detection set.
* ``ranking_top2``: the study's 5-way ranking (1 when the true explanation ranks first or second;
  :mod:`medsae.interp.scorers.ranking`); ``ranking_study_top2`` the same under the study's own
  protocol (:mod:`medsae.interp.study.judge`).

Slices whose prediction is missing are left out (never filled with zeros). When more than
``MAX_MISSING`` of a set is missing, or a correlation is undefined (constant predictions or
truth), the value is NULL with the reason in ``extra``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

MAX_MISSING = 0.2
CHANCE = {
    "pearson": 0.0,
    "spearman": 0.0,
    "auroc": 0.5,
    "detection_bacc": 0.5,
    "detection_auroc": 0.5,
    "ranking_top2": 0.4,
    "ranking_study_top2": 0.4,  # the study's protocol (medsae.interp.study.judge)
}


@dataclass
class Score:
    """One score value (a row of ``explanation_scores`` once ids are attached)."""

    method: str
    value: float | None
    n: int
    n_missing: int = 0
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def chance(self) -> float | None:
        return CHANCE.get(self.method)


def _finite(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def pearson(pred: np.ndarray, true: np.ndarray) -> float | None:
    """Pearson r; None when either side is constant or fewer than 3 pairs."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    if len(pred) < 3 or np.ptp(pred) == 0 or np.ptp(true) == 0:
        return None
    p, t = pred - pred.mean(), true - true.mean()
    return _finite(float(p @ t / np.sqrt((p @ p) * (t @ t))))


def rowwise_pearson(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of two [B, n] arrays (NaN where a row is constant)."""
    p = pred - pred.mean(axis=1, keepdims=True)
    t = true - true.mean(axis=1, keepdims=True)
    denom = np.sqrt((p * p).sum(axis=1) * (t * t).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(axis=1) / denom
    return np.where(denom > 1e-12, r, np.nan)


def spearman(pred: np.ndarray, true: np.ndarray) -> float | None:
    """Spearman rho (Pearson r of average ranks)."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    if len(pred) < 3:
        return None
    return pearson(stats.rankdata(pred), stats.rankdata(true))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with ties as 1/2); None without both classes."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def balanced_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean of sensitivity and specificity; None without both classes."""
    predicted, labels = np.asarray(predicted, bool), np.asarray(labels, bool)
    if labels.all() or not labels.any():
        return None
    return float(0.5 * (predicted[labels].mean() + (~predicted[~labels]).mean()))


def bootstrap_ci(pred: np.ndarray, true: np.ndarray, n_boot: int, seed: int) -> tuple[float | None, float | None]:
    """Percentile 95 % interval of Pearson r over ``n_boot`` seeded resamples of the pairs."""
    if n_boot <= 0 or len(pred) < 3:
        return None, None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pred), size=(n_boot, len(pred)))
    r = rowwise_pearson(np.asarray(pred, float)[idx], np.asarray(true, float)[idx])
    r = r[np.isfinite(r)]
    if len(r) < max(10, n_boot // 10):
        return None, None
    lo, hi = np.percentile(r, [2.5, 97.5])
    return float(lo), float(hi)


def permutation_p(pred: np.ndarray, true: np.ndarray, r: float, n_perm: int, seed: int) -> float | None:
    """One-sided p-value of r: (1 + #{permuted r >= r}) / (1 + n_perm)."""
    if n_perm <= 0 or r is None:
        return None
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.tile(np.asarray(true, float), (n_perm, 1)), axis=1)
    perm = rowwise_pearson(np.tile(np.asarray(pred, float), (n_perm, 1)), shuffled)
    perm = np.nan_to_num(perm, nan=0.0)
    return float((1 + np.sum(perm >= r - 1e-12)) / (1 + n_perm))


def _missing_guard(pred: np.ndarray) -> tuple[np.ndarray, int, str | None]:
    ok = np.isfinite(pred)
    n_missing = int((~ok).sum())
    reason = None
    if len(pred) == 0:
        reason = "empty set"
    elif n_missing > MAX_MISSING * len(pred):
        reason = f"parse_failed: {n_missing} of {len(pred)} predictions missing"
    return ok, n_missing, reason


def score_simulation(pred: np.ndarray, true: np.ndarray, n_boot: int, n_perm: int, seed: int) -> list[Score]:
    """``pearson`` (CI, p), ``spearman`` and ``auroc`` of one simulation set."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    ok, n_missing, reason = _missing_guard(pred)
    p, t = pred[ok], true[ok]
    n = int(ok.sum())
    deciles = _calibration(p, t)
    if reason is not None:
        extra = {"reason": reason}
        return [Score(m, None, n, n_missing, extra=extra) for m in ("pearson", "spearman", "auroc")]
    r = pearson(p, t)
    lo, hi = bootstrap_ci(p, t, n_boot, seed) if r is not None else (None, None)
    out = [
        Score(
            "pearson",
            r,
            n,
            n_missing,
            lo,
            hi,
            permutation_p(p, t, r, n_perm, seed + 1) if r is not None else None,
            extra={"calibration": deciles} | ({} if r is not None else {"reason": "constant predictions or truth"}),
        )
    ]
    rho = spearman(p, t)
    out.append(Score("spearman", rho, n, n_missing, extra={} if rho is not None else {"reason": "undefined"}))
    auc = auroc(p, t > 0)
    out.append(Score("auroc", auc, n, n_missing, extra={} if auc is not None else {"reason": "one class only"}))
    return out


def score_detection(pred: np.ndarray, true: np.ndarray, scale: int = 1) -> list[Score]:
    """``detection_bacc`` (prediction >= scale/2 means 'fires') and ``detection_auroc``."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    ok, n_missing, reason = _missing_guard(pred)
    n = int(ok.sum())
    if reason is not None:
        return [Score(m, None, n, n_missing, extra={"reason": reason}) for m in ("detection_bacc", "detection_auroc")]
    p, fires = pred[ok], true[ok] > 0
    bacc = balanced_accuracy(p >= scale / 2, fires)
    auc = auroc(p, fires)
    why = {} if bacc is not None else {"reason": "one class only"}
    return [
        Score("detection_bacc", bacc, n, n_missing, extra=why),
        Score("detection_auroc", auc, n, n_missing, extra=why),
    ]


def _calibration(pred: np.ndarray, true: np.ndarray) -> list[float | None]:
    """Mean prediction per true-activation decile of the firing slices, non-firing first (docs/method.md#scoring)."""
    if len(pred) == 0:
        return []
    out: list[float | None] = [float(pred[true <= 0].mean()) if (true <= 0).any() else None]
    firing = np.flatnonzero(true > 0)
    if len(firing):
        order = firing[np.argsort(true[firing], kind="stable")]
        out += [float(pred[c].mean()) if len(c) else None for c in np.array_split(order, 10)]
    return [None if v is None else round(v, 4) for v in out]


def summarize_values(values: np.ndarray) -> dict[str, float | int | None]:
    """Aggregate of per-latent scores (docs/method.md#scoring): NULL excluded and NULL as 0."""
    v = np.asarray([x for x in values], dtype=float)
    ok = v[np.isfinite(v)]
    as_zero = np.nan_to_num(v, nan=0.0)
    return {
        "n": int(len(v)),
        "n_null": int(len(v) - len(ok)),
        "mean": float(ok.mean()) if len(ok) else None,
        "median": float(np.median(ok)) if len(ok) else None,
        "mean_null_as_0": float(as_zero.mean()) if len(v) else None,
        "share_ge_0.5": float((ok >= 0.5).mean()) if len(ok) else None,
        "share_ge_0.8": float((ok >= 0.8).mean()) if len(ok) else None,
    }

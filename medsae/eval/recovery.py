"""Performance recovery (docs/method.md#recovery): how much of the dense probe's quality the top-N latents keep.

For every binary leaf task (a binary target, or one class of a multiclass target one-vs-rest)
whose dense-probe val ROC-AUC is at least 0.55:

1. Rank the latents by the full-dictionary sparse probe's coefficients (:func:`study_ranking`:
   ``|coef|`` for a binary target, mean ``|coef|`` over the classes of a multiclass target, as the
   study's group tables), keep the top 100.
2. For each N (1, 2, 3, 5, 10, 20, 30, 50, 75, 100, plus the sparse probe's ``n_nonzero`` if at most
   100) refit a binary elastic-net probe on the top-N latents only (5,000-row stratified train
   sub-sample, ``max_iter`` 200) and score its ROC-AUC. All N of one task are solved as one batched
   problem (:func:`medsae.eval.logreg.fit_binary` with a feature mask).
3. ``recovery(N) = AUC(N) / AUC_dense`` (the study's ratio) and the chance-adjusted
   ``(AUC(N) - 0.5) / (AUC_dense - 0.5)`` (0 = chance, 1 = dense quality), and the smallest N
   reaching 50 ... 100 % of the dense AUC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medsae.eval.logreg import Matrix, fit_binary
from medsae.eval.probes import ProbeResult, ProbeSettings, roc_auc_columns, stratified_subsample, take_rows

#: The study's N values.
STUDY_NS = (1, 2, 3, 5, 10, 20, 30, 50, 75, 100)
#: Tasks whose dense val AUC is below this are skipped (the study's filter).
MIN_DENSE_AUC = 0.55
#: Latents kept from the coefficient ranking.
TOP = 100


def study_ranking(coef: np.ndarray, top: int = TOP) -> np.ndarray:
    """Latents ordered by importance: ``|coef|`` of a binary probe (``coef [d, 1]``) or the mean
    ``|coef|`` over classes (``[d, K]``); descending, ties by latent index; the first ``top``."""
    score = np.abs(np.asarray(coef)).mean(axis=1)
    return np.argsort(-score, kind="stable")[:top]


def curve_ns(ns: Sequence[int], n_nonzero: int | None, available: int) -> list[int]:
    """The study's N list: ``ns`` plus the probe's ``n_nonzero`` when it is at most the largest N,
    capped at the ``available`` ranked latents, ascending and unique."""
    values = set(int(n) for n in ns)
    if n_nonzero is not None and 0 < n_nonzero <= max(ns):
        values.add(int(n_nonzero))
    return sorted({min(n, available) for n in values if n >= 1})


def recovery_ratio(auc: float, dense_auc: float) -> float:
    """The study's recovery: ``AUC(N) / AUC_dense``."""
    return float(auc / dense_auc) if dense_auc > 0 else float("nan")


def recovery_chance_adjusted(auc: float, dense_auc: float) -> float:
    """Chance-adjusted recovery: ``(AUC(N) - 0.5) / (AUC_dense - 0.5)``. Unlike the ratio, a
    chance-level probe scores 0, not 0.5/AUC_dense (which is >= 0.5 for every target)."""
    return float((auc - 0.5) / (dense_auc - 0.5)) if dense_auc > 0.5 else float("nan")


def n_to_reach(ns: Sequence[int], ratios: Sequence[float], threshold: float) -> float:
    """Smallest N whose recovery ratio is at least ``threshold``; NaN when none reaches it."""
    for n, r in zip(ns, ratios, strict=True):
        if np.isfinite(r) and r >= threshold - 1e-12:
            return float(n)
    return float("nan")


def mean_n_features_study(table: np.ndarray) -> float:
    """The study's ranking quantity (docs/method.md#ranking): ``table [targets, thresholds]`` of N-to-reach values;
    NaN in a column is replaced by that column's max + 1 (100 if the whole column is NaN); the
    mean over all cells. Lower = fewer latents needed."""
    t = np.array(table, dtype=np.float64)
    if t.size == 0:
        return float("nan")
    for j in range(t.shape[1]):
        col = t[:, j]
        fill = np.nanmax(col) + 1 if np.isfinite(col).any() else 100.0
        col[~np.isfinite(col)] = fill
    return float(t.mean())


@dataclass
class RecoveryCurve:
    """One task's curve: AUC per N per split, with the dense baselines."""

    task: str
    ns: list[int]
    ranking: np.ndarray
    dense_auc: dict[str, float]
    auc: dict[str, np.ndarray] = field(default_factory=dict)  # split -> [len(ns)]
    n_train: int = 0
    coef: np.ndarray | None = None  # [len(ranking), len(ns)]: column c = the probe on the top ns[c]
    intercept: np.ndarray | None = None  # [len(ns)]

    def ratios(self, split: str) -> np.ndarray:
        return np.array([recovery_ratio(a, self.dense_auc.get(split, np.nan)) for a in self.auc[split]])

    def chance_adjusted(self, split: str) -> np.ndarray:
        return np.array([recovery_chance_adjusted(a, self.dense_auc.get(split, np.nan)) for a in self.auc[split]])

    def n_to_reach(self, split: str, threshold: float) -> float:
        return n_to_reach(self.ns, self.ratios(split), threshold)


def fit_curve(
    task: str,
    y: np.ndarray,
    ranking: np.ndarray,
    ns: Sequence[int],
    train_rows: np.ndarray,
    eval_rows: dict[str, np.ndarray],
    x_train: Matrix,
    x_eval: dict[str, Matrix],
    dense_auc: dict[str, float],
    settings: ProbeSettings,
) -> RecoveryCurve:
    """Refit a binary probe on the top-N ranked latents for every N at once and score it.

    ``y`` holds 1 / 0 / -1 per global row; ``x_train`` are the rows ``train_rows`` of the sparse
    codes restricted to ``ranking`` columns (likewise ``x_eval``): only those columns matter.
    """
    ns = list(ns)
    width = len(ranking)
    mask = np.arange(width)[:, None] < np.asarray(ns)[None, :]  # [width, len(ns)]
    y_train = y[train_rows]
    fit = fit_binary(
        x_train,
        np.repeat(y_train[:, None], len(ns), axis=1),
        C=settings.C,
        l1_ratio=settings.l1_ratio,
        max_iter=settings.max_iter,
        tol=settings.tol,
        feature_mask=mask,
        backend=settings.backend,
        device=settings.device,
        seed=settings.seed,
        threads=settings.threads,
    )
    curve = RecoveryCurve(task, ns, ranking, dense_auc, n_train=len(train_rows), coef=fit.coef, intercept=fit.intercept)
    for split, rows in eval_rows.items():
        score_curve(curve, x_eval[split], y[rows], split)
    return curve


def score_curve(curve: RecoveryCurve, x_eval: Matrix, y_eval: np.ndarray, split: str) -> None:
    """ROC-AUC of each top-N probe of ``curve`` on one split (``x_eval``: codes on the ranked columns)."""
    lab = y_eval >= 0
    z = np.asarray(x_eval[np.flatnonzero(lab)] @ curve.coef) + curve.intercept[None, :]
    curve.auc[split] = roc_auc_columns(y_eval[lab], z)


def run_recovery(
    sparse_results: Sequence[ProbeResult],
    dense_auc: dict[str, dict[str, float]],
    train_rows: np.ndarray,
    eval_rows: dict[str, np.ndarray],
    codes: object,
    settings: ProbeSettings,
    ns: Sequence[int] = STUDY_NS,
    min_dense_auc: float = MIN_DENSE_AUC,
    select_split: str = "val",
) -> list[RecoveryCurve]:
    """Curves for every leaf task of the sparse probes whose dense AUC on ``select_split`` (the
    study: val) is at least ``min_dense_auc``. ``dense_auc[split][task]`` from the dense probes;
    ``codes`` is the sparse-code source (matrix or loader by global row)."""
    tasks = []
    for res in sparse_results:
        ranking = study_ranking(res.coef)
        for task, y in res.target.leaves():
            base = dense_auc.get(select_split, {}).get(task, float("nan"))
            if np.isfinite(base) and base >= min_dense_auc:
                tasks.append(
                    (
                        task,
                        y,
                        ranking,
                        res.fit.n_nonzero if res.column is None else int(np.count_nonzero(res.coef)),
                    )
                )
    if not tasks:
        return []
    # rows needed: each task's stratified sub-sample of the labelled train rows, and the eval rows
    subsamples = []
    for _, y, _, _ in tasks:
        lab = train_rows[y[train_rows] >= 0]
        subsamples.append(lab[stratified_subsample(y[lab], settings.max_train, settings.seed)])
    needed = np.unique(np.concatenate(subsamples))
    x_needed = take_rows(codes, needed)
    x_eval_all = {split: take_rows(codes, rows) for split, rows in eval_rows.items()}
    curves = []
    for (task, y, ranking, n_nonzero), rows in zip(tasks, subsamples, strict=True):
        task_ns = curve_ns(ns, n_nonzero, len(ranking))
        cols = ranking[: max(task_ns)]
        x_train = x_needed[np.searchsorted(needed, rows)][:, cols]
        x_eval = {split: x[:, cols] for split, x in x_eval_all.items()}
        base = {split: dense_auc.get(split, {}).get(task, float("nan")) for split in eval_rows}
        curves.append(fit_curve(task, y, cols, task_ns, rows, eval_rows, x_train, x_eval, base, settings))
    return curves

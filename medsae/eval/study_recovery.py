"""The study's performance recovery over its group coefficient tables (docs/method.md#study-protocol).

For each group's sparse probe (:mod:`medsae.eval.study_probes`) and each target of the group, in the
group's order:

1. Skip the target when its dense validation AUC is below 0.55 (or has no value: the study's run
   then compared with NaN and wrote only empty thresholds, which no mean or ranking reads).
2. Latent ranking = the *group's* coefficient table (top 100), shared by all its targets.
3. N in 1, 2, 3, 5, 10, 20, 30, 50, 75, 100, plus the group probe's ``n_nonzero`` when it is at
   most 100 (even 0), keeping the N the table can fill (:func:`study_ns`).
4. Training rows: one sub-sample per *group* (5,000; the study's ``train_test_split`` stratified by
   the group's labels), then per target a binary one-vs-rest problem on it; a target with one class
   in those rows is skipped (institutes without training slices).
5. For each N an elastic-net refit on the top N latents (200 iterations), scored by ROC-AUC of the
   predicted probability on each split; ``recovery(N) = AUC(N) / AUC_dense`` as medsae's curves
   (:class:`~medsae.eval.recovery.RecoveryCurve`), so the same rows and means are written.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medsae.eval.probes import ProbeSettings, roc_auc_columns, take_rows
from medsae.eval.recovery import MIN_DENSE_AUC, STUDY_NS, RecoveryCurve, fit_curve
from medsae.eval.study_probes import TOP, GroupProbe, expit, group_training_rows


def study_ns(ns: Sequence[int], n_nonzero: int, available: int) -> list[int]:
    """The study's N list: ``ns`` plus ``n_nonzero`` when it is at most ``max(ns)``, keeping only the
    N not above ``available`` (the table's length), ascending."""
    values = {int(n) for n in ns}
    if n_nonzero <= max(ns):
        values.add(int(n_nonzero))
    return sorted(n for n in values if n <= available)


def score_curve_proba(curve: RecoveryCurve, x_eval: object, y_eval: np.ndarray, split: str) -> None:
    """ROC-AUC of each top-N probe on one split from its predicted probabilities (as the study)."""
    lab = np.flatnonzero(y_eval >= 0)
    z = np.asarray(x_eval[lab] @ curve.coef) + curve.intercept[None, :]  # type: ignore[index]
    curve.auc[split] = roc_auc_columns(y_eval[lab], expit(z))


def run_study_recovery(
    sparse_probes: Sequence[GroupProbe],
    dense_auc: dict[str, dict[str, float]],
    train_rows: np.ndarray,
    eval_rows: dict[str, np.ndarray],
    codes: object,
    settings: ProbeSettings,
    ns: Sequence[int] = STUDY_NS,
    min_dense_auc: float = MIN_DENSE_AUC,
    select_split: str = "val",
    top: int = TOP,
) -> tuple[list[RecoveryCurve], list[str]]:
    """Curves of every eligible target (see the module docstring) and the groups whose sub-sample was
    not the study's. ``dense_auc[split][target]`` from the dense group probes; ``train_rows`` in the
    study's order; ``codes`` the sparse-code source by global row."""
    curves: list[RecoveryCurve] = []
    inexact: list[str] = []
    x_eval_all = {split: take_rows(codes, rows) for split, rows in eval_rows.items()}
    for probe in sparse_probes:
        group = probe.group
        ranking = probe.ranking(top)
        task_ns = study_ns(ns, probe.n_nonzero, len(ranking))
        if not task_ns:
            continue
        rows, exact = group_training_rows(group, train_rows, settings.max_train, settings.seed)
        if not exact:
            inexact.append(group.group)
        cols = ranking[: max(task_ns)]
        x_train = take_rows(codes, rows)[:, cols]
        x_eval = {split: x[:, cols] for split, x in x_eval_all.items()}
        for i, task in enumerate(group.target_names()):
            base = dense_auc.get(select_split, {}).get(task, float("nan"))
            if not (np.isfinite(base) and base >= min_dense_auc):
                continue
            y = group.task_labels(i)
            y_train = y[rows]
            if not ((y_train == 1).any() and (y_train == 0).any()):
                continue
            baselines = {split: dense_auc.get(split, {}).get(task, float("nan")) for split in eval_rows}
            curve = fit_curve(task, y, cols, task_ns, rows, {}, x_train, {}, baselines, settings)
            for split, erows in eval_rows.items():
                score_curve_proba(curve, x_eval[split], y[erows], split)
            curves.append(curve)
    return curves, inexact

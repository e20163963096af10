"""The study's linear probes, one classifier per target group (docs/method.md#study-protocol).

For each :class:`~medsae.eval.targets.StudyGroup` and each feature source (dense embeddings, sparse
codes), on the same training rows for both:

1. Training rows: the train split in the study's row order (multiclass: the labelled rows), cut to
   ``max_train`` with scikit-learn's ``train_test_split(train_size, stratify, random_state=seed)``
   stratified by the class (multilabel: by the label combination as text), which selects the very
   rows the study's sub-sample holds when the train rows are in its order. Where that split is
   impossible (a stratum with one row, where the study would have stopped) medsae's own stratified
   sub-sample is used and the group is named in the stage summary.
2. Fit (elastic net, :mod:`medsae.eval.logreg`): a multiclass group over the classes present in
   the training rows - binary for two, softmax for more; a multilabel group as one binary problem
   per label.
3. Score every target of the group on each split by ROC-AUC of the predicted probability, computed
   as scikit-learn's ``predict_proba`` does. A multiclass target ``i`` is scored with probability
   column ``i`` of the classes present in training, the study's indexing: when classes are missing
   from training (institutes A, D, E) the later targets are scored on another class's column, and a
   target whose index passes the last column gets no score (docs/method.md#problem-20). A two-class
   group gives two mirror targets with the same AUC, both counted (docs/method.md#problem-21).
4. The group's coefficient table (:meth:`GroupProbe.ranking`): latents by |coef| (binary) or mean
   |coef| over classes or labels, the top 100; every target of the group shares it
   (docs/method.md#problem-22).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from medsae.eval.logreg import LogRegFit, Matrix, fit_binary, fit_multinomial
from medsae.eval.probes import ProbeSettings, Source, roc_auc, stratified_subsample, take_rows
from medsae.eval.targets import StudyGroup

#: Latents in a group's coefficient table (the study's top-100 files).
TOP = 100


def study_subsample(strata: np.ndarray, max_n: int, seed: int) -> tuple[np.ndarray, bool]:
    """Positions of at most ``max_n`` items, stratified as the study's ``train_test_split`` draws them,
    and whether that draw was possible (else medsae's :func:`stratified_subsample` stands in)."""
    n = len(strata)
    if n <= max_n:
        return np.arange(n), True
    from sklearn.model_selection import train_test_split

    try:
        chosen, _ = train_test_split(np.arange(n), train_size=max_n, stratify=strata, random_state=seed)
    except ValueError:  # a stratum too small to split
        return stratified_subsample(strata, max_n, seed), False
    return np.sort(chosen), True


def group_training_rows(group: StudyGroup, train_rows: np.ndarray, max_n: int, seed: int) -> tuple[np.ndarray, bool]:
    """The group's training rows (global row numbers), from ``train_rows`` in the study's order."""
    rows = group.labelled(train_rows)
    pos, exact = study_subsample(group.strata(rows), max_n, seed)
    return rows[pos], exact


def expit(z: np.ndarray) -> np.ndarray:
    """The logistic function in float64, as scikit-learn's probabilities (saturating like them)."""
    from scipy.special import expit as _expit

    return _expit(np.asarray(z, dtype=np.float64))


@dataclass
class GroupProbe:
    """One group probed with one feature source: the fit, the classes it saw, AUC per target per split."""

    group: StudyGroup
    features: str  # 'dense' | 'sparse'
    fit: LogRegFit
    present: np.ndarray  # multiclass: class indices in the training rows (sorted); multilabel: all labels
    n_train: int
    n_features: int
    exact_subsample: bool = True
    aucs: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> target -> AUC
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> target -> rows scored

    @property
    def n_nonzero(self) -> int:
        """Latents with a non-zero coefficient for any class or label (the study's ``n_nonzero``)."""
        return self.fit.n_nonzero

    def importance(self) -> np.ndarray:
        """The coefficient table's score per feature: |coef|, or mean |coef| over classes / labels."""
        return np.abs(self.fit.coef).mean(axis=1)

    def ranking(self, top: int = TOP) -> np.ndarray:
        """The ``top`` features by :meth:`importance`, descending. Ties (zero coefficients) go to the
        higher index first: the study's ``argsort(...)[::-1]`` with a stable sort (its unstable sort
        leaves their order to the sorting algorithm)."""
        return np.argsort(self.importance(), kind="stable")[::-1][:top]

    def probabilities(self, x: Matrix) -> np.ndarray:
        """``predict_proba`` of the study's classifier: multiclass columns = present classes in order
        (two classes: ``[1 - p, p]``); multilabel columns = each label's positive probability."""
        z = self.fit.decision(x)
        if self.group.multilabel:
            return expit(z)
        if len(self.present) == 2:
            p = expit(z[:, 0])
            return np.stack([1.0 - p, p], axis=1)
        return self.fit.predict_proba(x)


def fit_group(group: StudyGroup, x: Matrix, rows: np.ndarray, settings: ProbeSettings) -> tuple[LogRegFit, np.ndarray]:
    """Fit the group's classifier on ``x`` (the features of ``rows``); returns the fit and the classes seen."""
    common = dict(
        C=settings.C,
        l1_ratio=settings.l1_ratio,
        max_iter=settings.max_iter,
        tol=settings.tol,
        backend=settings.backend,
        device=settings.device,
        seed=settings.seed,
        threads=settings.threads,
    )
    y = group.y[rows]
    if group.multilabel:
        return fit_binary(x, y, **common), np.arange(y.shape[1])
    present = np.unique(y)
    if len(present) == 2:
        return fit_binary(x, (y == present[1]).astype(np.int64), **common), present
    return fit_multinomial(x, np.searchsorted(present, y), len(present), **common), present


def score_group(probe: GroupProbe, x_eval: Matrix, eval_rows: np.ndarray, split: str) -> None:
    """AUC of every target of the group on one split (``x_eval``: features of ``eval_rows``)."""
    group = probe.group
    if group.multilabel:
        lab = np.arange(len(eval_rows))
    else:
        lab = np.flatnonzero(group.y[eval_rows] >= 0)
    aucs, counts = {}, {}
    proba = probe.probabilities(x_eval[lab]) if len(lab) else np.zeros((0, 0))
    for i, name in enumerate(group.target_names()):
        y = group.task_labels(i)[eval_rows[lab]]
        aucs[name] = roc_auc(y, proba[:, i]) if i < proba.shape[1] else float("nan")
        counts[name] = len(lab)
    probe.aucs[split], probe.counts[split] = aucs, counts


def run_group_probes(
    groups: Sequence[StudyGroup],
    train_rows: np.ndarray,
    eval_rows: dict[str, np.ndarray],
    sources: dict[str, Source],
    settings: ProbeSettings,
) -> list[GroupProbe]:
    """Fit every group on every feature source and score it on every evaluated split.

    ``train_rows`` must be in the study's order (:func:`medsae.eval.targets.study_order`) for the
    sub-samples to be the study's; ``eval_rows[split]`` are global row numbers.
    """
    plans = [(g, *group_training_rows(g, train_rows, settings.max_train, settings.seed)) for g in groups]
    needed = np.unique(np.concatenate([rows for _, rows, _ in plans])) if plans else np.array([], np.int64)
    out: list[GroupProbe] = []
    for features, source in sources.items():
        x_needed = take_rows(source, needed)
        eval_x = {split: take_rows(source, rows) for split, rows in eval_rows.items()}
        for group, rows, exact in plans:
            x = x_needed[np.searchsorted(needed, rows)]
            fit, present = fit_group(group, x, rows, settings)
            probe = GroupProbe(group, features, fit, present, len(rows), x.shape[1], exact)
            for split, erows in eval_rows.items():
                score_group(probe, eval_x[split], erows, split)
            out.append(probe)
    return out


def coefficient_tables(probes: Sequence[GroupProbe], top: int = TOP) -> pd.DataFrame:
    """The study's per-target ``*_coefficients_sparse.csv`` files as one long table (columns group, target,
    rank, latent, importance): each sparse group probe's table (:meth:`GroupProbe.ranking`), once per
    target of the group as the study wrote it. ``interpret.protocol: study`` ranks latents by them."""
    frames = []
    for p in probes:
        if p.features != "sparse":
            continue
        ranking = p.ranking(top)
        importance = p.importance()[ranking]
        for target in p.group.target_names():
            frames.append(
                pd.DataFrame(
                    {
                        "group": p.group.group,
                        "target": target,
                        "rank": np.arange(1, len(ranking) + 1, dtype=np.int64),
                        "latent": ranking.astype(np.int64),
                        "importance": importance.astype(np.float64),
                    }
                )
            )
    columns = ["group", "target", "rank", "latent", "importance"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def dense_aucs(probes: Sequence[GroupProbe], split: str) -> dict[str, float]:
    """Target -> dense-probe AUC on ``split``."""
    out: dict[str, float] = {}
    for p in probes:
        if p.features == "dense":
            out.update(p.aucs.get(split, {}))
    return out

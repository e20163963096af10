"""Linear probes (docs/method.md#probes): which slice labels are linearly readable from a representation.

Targets (the study's groups, from the slice table and the structure-presence matrix):

======================  ===========  ===============================================================
target                  kind         labels (rows matching none are unlabelled and ignored)
======================  ===========  ===============================================================
``modality``            binary       ct / mri
``plane``               multiclass   axial / coronal / sagittal
``sex``                 binary       m / f
``age_group``           binary       ``<40`` / ``>=80`` (the study leaves 40-80 unlabelled)
``institute``           multiclass   every institute with enough training rows
``pathology=<p>``       binary       p vs any other recorded pathology (p in inflammation, tumor, trauma)
``structure=<s>``       binary       structure s present on the slice / absent
======================  ===========  ===============================================================

Classifier: elastic-net logistic regression, C = 1, l1_ratio = 0.5, balanced class weights, no
feature scaling (:mod:`medsae.eval.logreg`), fitted on a stratified sub-sample (10,000 by default)
of the train split, scored on the evaluated splits by ROC-AUC (binary; multiclass: one-vs-rest per
class and their unweighted mean). Dense input = raw embeddings; sparse input = the full SAE code.

Deliberate differences from the study's code, each fixing a problem listed in docs/method.md#study-code-problems:
a class without enough training rows is removed from its target (item 20: the study scored
institutes A/D/E, absent from training, on the wrong probability columns); a two-class target is
one binary target, not two mirror-image ones (item 21); every structure is its own target with its
own coefficient ranking (item 22); pathology negatives are slices with another recorded pathology,
not slices without a record (MRI). All structure targets share one training sub-sample (stratified
by modality x plane) so they are fitted together as one batched problem.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from medsae.eval.logreg import LogRegFit, Matrix, fit_binary, fit_multinomial

#: Target groups in the study's order.
GROUPS = ("modality", "plane", "sex", "age_group", "institute", "pathology", "structure")
#: The study's pathology targets.
PATHOLOGIES = ("inflammation", "tumor", "trauma")
#: Targets with at least this dense AUC enter the study's averages (docs/method.md#recovery: "dense > 0.6").
MEAN_MIN_DENSE_AUC = 0.6

#: A feature source: a matrix indexed by global row, or a loader ``rows -> matrix``.
Source = Matrix | Callable[[np.ndarray], Matrix]


@dataclass
class Target:
    """One probe target. ``y[i]`` is the class index of slice row ``i`` or -1 (unlabelled)."""

    name: str
    group: str
    classes: list[str]  # binary: [negative, positive]
    y: np.ndarray

    @property
    def multiclass(self) -> bool:
        return len(self.classes) > 2

    def leaves(self) -> list[tuple[str, np.ndarray]]:
        """The binary one-vs-rest tasks of this target (used by recovery and the averages):
        a binary target is itself; a multiclass one gives ``name=class`` per class."""
        if not self.multiclass:
            return [(self.name, self.y)]
        return [
            (f"{self.name}={c}", np.where(self.y < 0, -1, (self.y == k).astype(np.int64)))
            for k, c in enumerate(self.classes)
        ]


def _categorical(name: str, group: str, values: pd.Series, classes: Sequence[str]) -> Target:
    lookup = {c: i for i, c in enumerate(classes)}
    y = values.map(lambda v: lookup.get(v, -1) if isinstance(v, str) else -1).to_numpy(dtype=np.int64)
    return Target(name, group, list(classes), y)


def build_targets(
    slices: pd.DataFrame,
    groups: Sequence[str] = GROUPS,
    presence: sp.spmatrix | None = None,
    vocab: Sequence[str] | None = None,
    structures: Sequence[str] | None = None,
) -> list[Target]:
    """All candidate targets over the rows of ``slices`` (in row order); filter with
    :func:`select_targets`. ``presence [n, V]`` / ``vocab`` give the structure targets
    (``structures`` restricts them to a list, e.g. the study's ten organs)."""
    out: list[Target] = []
    for group in groups:
        if group == "modality":
            out.append(_categorical("modality", group, slices["modality"], ["ct", "mri"]))
        elif group == "plane":
            out.append(_categorical("plane", group, slices["plane"], ["axial", "coronal", "sagittal"]))
        elif group == "sex":
            out.append(_categorical("sex", group, slices["sex"], ["m", "f"]))
        elif group == "age_group":
            out.append(_categorical("age_group", group, slices["age_bin"], ["<40", ">=80"]))
        elif group == "institute":
            values = sorted(v for v in slices["institute"].dropna().unique() if isinstance(v, str))
            out.append(_categorical("institute", group, slices["institute"], values))
        elif group == "pathology":
            recorded = slices["pathology"].map(lambda v: isinstance(v, str) and v != "")
            for p in PATHOLOGIES:
                y = np.where(recorded, (slices["pathology"] == p).astype(np.int64), -1)
                out.append(Target(f"pathology={p}", group, ["other", p], y))
        elif group == "structure":
            if presence is None or vocab is None:
                continue
            presence = sp.csc_matrix(presence)
            wanted = list(vocab) if structures is None else [s for s in structures if s in set(vocab)]
            index = {s: j for j, s in enumerate(vocab)}
            for s in wanted:
                col = np.asarray(presence[:, index[s]].todense()).ravel() > 0
                out.append(Target(f"structure={s}", group, ["absent", "present"], col.astype(np.int64)))
        else:
            raise ValueError(f"unknown probe target group {group!r} (known: {', '.join(GROUPS)})")
    return out


def select_targets(targets: Sequence[Target], train_rows: np.ndarray, min_count: int) -> list[Target]:
    """Keep the classes with at least ``min_count`` training rows (others become unlabelled) and
    the targets that still have two classes. A multiclass target left with two becomes binary."""
    out = []
    for t in targets:
        counts = np.bincount(t.y[train_rows][t.y[train_rows] >= 0], minlength=len(t.classes))
        keep = np.flatnonzero(counts >= min_count)
        if len(keep) < 2:
            continue
        if len(keep) == len(t.classes):
            out.append(t)
            continue
        remap = np.full(len(t.classes) + 1, -1, dtype=np.int64)  # last slot: unlabelled (-1)
        remap[keep] = np.arange(len(keep))
        out.append(Target(t.name, t.group, [t.classes[k] for k in keep], remap[t.y]))
    return out


def stratified_subsample(strata: np.ndarray, max_n: int, seed: int) -> np.ndarray:
    """Positions of at most ``max_n`` items, each stratum represented in proportion to its size
    (largest-remainder rounding, at least one item per stratum); all items when there are few."""
    strata = np.asarray(strata)
    n = len(strata)
    if n <= max_n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    values, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    exact = counts * (max_n / n)
    take = np.maximum(np.floor(exact).astype(np.int64), 1)
    short = max_n - take.sum()
    if short > 0:
        take[np.argsort(-(exact - np.floor(exact)), kind="stable")[:short]] += 1
    take = np.minimum(take, counts)
    order = np.lexsort((rng.random(n), inverse))  # random order within each stratum
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, counts)
    return np.sort(np.flatnonzero(rank < take[inverse]))


# -- scoring ---------------------------------------------------------------------------------------


def roc_auc_columns(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC-AUC of every column of ``scores [n, C]`` for the binary labels ``y [n]``.

    Mann-Whitney form: ``AUC = (Σ rank(positives) - P (P + 1) / 2) / (P · N)`` with average ranks
    for ties - the area under the ROC curve that ``sklearn.metrics.roc_auc_score`` computes, for
    all columns with one sort each. NaN when ``y`` lacks positives or negatives.
    """
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.full(scores.shape[1], np.nan)
    ranks = rankdata(scores, axis=0)
    return (ranks[y].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC of one binary task (:func:`roc_auc_columns`); NaN when ``y`` lacks a class."""
    return float(roc_auc_columns(y, np.asarray(score)[:, None])[0])


def roc_auc_ovr(y: np.ndarray, proba: np.ndarray) -> tuple[float, np.ndarray]:
    """One-vs-rest ROC-AUC per class (column ``k`` of ``proba`` scores class ``k``) and their
    unweighted (macro) mean over the classes present with both positives and negatives."""
    per_class = np.array([roc_auc(y == k, proba[:, k]) for k in range(proba.shape[1])])
    ok = np.isfinite(per_class)
    return (float(per_class[ok].mean()) if ok.any() else float("nan")), per_class


@dataclass
class ProbeSettings:
    """Classifier and sampling settings (the study's defaults)."""

    C: float = 1.0
    l1_ratio: float = 0.5
    max_iter: int = 1000
    tol: float = 1e-4
    max_train: int = 10_000
    backend: str = "torch"
    device: str = "auto"
    seed: int = 42
    threads: int | None = 1


@dataclass
class ProbeResult:
    """One target probed with one feature set."""

    target: Target
    features: str  # 'dense' | 'sparse'
    fit: LogRegFit
    column: int | None  # binary targets fitted in a batch: their column in ``fit``
    n_train: int
    n_features: int
    #: split -> {"auc": value, "n": rows, "per_class": array (multiclass only)}
    scores: dict[str, dict] = field(default_factory=dict)

    @property
    def coef(self) -> np.ndarray:
        """``[d, 1]`` for a binary target, ``[d, K]`` for a multiclass one."""
        return self.fit.coef if self.column is None else self.fit.coef[:, [self.column]]

    @property
    def intercept(self) -> np.ndarray:
        return self.fit.intercept if self.column is None else self.fit.intercept[[self.column]]

    def leaf_aucs(self, split: str) -> dict[str, float]:
        """AUC of each binary leaf task (see :meth:`Target.leaves`) on ``split``."""
        sc = self.scores.get(split)
        if sc is None:
            return {}
        if not self.target.multiclass:
            return {self.target.name: sc["auc"]}
        return {name: float(a) for (name, _), a in zip(self.target.leaves(), sc["per_class"], strict=True)}


def take_rows(source: Source, rows: np.ndarray) -> Matrix:
    """Rows of a feature source (array, sparse matrix or loader)."""
    if callable(source):
        return source(rows)
    if sp.issparse(source):
        return sp.csr_matrix(source)[rows]
    return np.asarray(source)[rows]


def score(result: ProbeResult, x_eval: Matrix, y_eval: np.ndarray, split: str) -> None:
    """Score a fitted probe on one split (``y_eval``: labels, -1 = unlabelled) into ``result.scores``."""
    score_logits(result, np.asarray(x_eval @ result.coef) + result.intercept[None, :], y_eval, split)


def score_logits(result: ProbeResult, z: np.ndarray, y_eval: np.ndarray, split: str) -> None:
    """:func:`score` from the probe's logits ``z [n, 1 or K]`` on all rows of the split."""
    lab = y_eval >= 0
    if not lab.any():
        result.scores[split] = {
            "auc": float("nan"),
            "n": 0,
            "per_class": np.full(len(result.target.classes), np.nan),
        }
        return
    z = z[lab]
    if result.target.multiclass:
        z = z - z.max(axis=1, keepdims=True)
        proba = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        macro, per_class = roc_auc_ovr(y_eval[lab], proba)
        result.scores[split] = {"auc": macro, "n": int(lab.sum()), "per_class": per_class}
    else:
        result.scores[split] = {"auc": roc_auc(y_eval[lab], z[:, 0]), "n": int(lab.sum())}


def run_probes(
    targets: Sequence[Target],
    train_rows: np.ndarray,
    eval_rows: dict[str, np.ndarray],
    sources: dict[str, Source],
    settings: ProbeSettings,
    strata: np.ndarray | None = None,
) -> list[ProbeResult]:
    """Fit every target on every feature source and score it on every evaluated split.

    ``train_rows`` / ``eval_rows[split]`` are global row numbers (into ``Target.y`` and the
    sources). ``strata`` (per global row) stratifies the shared sub-sample of the structure targets.
    Non-structure targets get their own sub-sample stratified by their label.
    """
    plans: list[tuple[list[Target], np.ndarray]] = []  # (targets fitted together, their train rows)
    for t in targets:
        if t.group == "structure":
            continue
        lab = train_rows[t.y[train_rows] >= 0]
        plans.append(([t], lab[stratified_subsample(t.y[lab], settings.max_train, settings.seed)]))
    batch = [t for t in targets if t.group == "structure"]
    if batch:
        keys = strata[train_rows] if strata is not None else np.zeros(len(train_rows))
        plans.append((batch, train_rows[stratified_subsample(keys, settings.max_train, settings.seed)]))

    needed = np.unique(np.concatenate([rows for _, rows in plans])) if plans else np.array([], np.int64)
    results: list[ProbeResult] = []
    for features, source in sources.items():
        x_needed = take_rows(source, needed)
        eval_x = {split: take_rows(source, rows) for split, rows in eval_rows.items()}
        for group_targets, rows in plans:
            x = x_needed[np.searchsorted(needed, rows)]
            fits = _fit(group_targets, x, rows, settings)
            logits = {split: fits[0][0].decision(xe) for split, xe in eval_x.items()}  # one product per fit
            for t, (fit, column) in zip(group_targets, fits, strict=True):
                res = ProbeResult(t, features, fit, column, len(rows), x.shape[1])
                for split, erows in eval_rows.items():
                    z = logits[split] if column is None else logits[split][:, [column]]
                    score_logits(res, z, t.y[erows], split)
                results.append(res)
    return results


def _fit(targets: list[Target], x: Matrix, rows: np.ndarray, s: ProbeSettings) -> list[tuple[LogRegFit, int | None]]:
    common = dict(
        C=s.C,
        l1_ratio=s.l1_ratio,
        max_iter=s.max_iter,
        tol=s.tol,
        backend=s.backend,
        device=s.device,
        seed=s.seed,
        threads=s.threads,
    )
    if len(targets) == 1 and targets[0].multiclass:
        t = targets[0]
        return [(fit_multinomial(x, t.y[rows], len(t.classes), **common), None)]
    y = np.stack([t.y[rows] for t in targets], axis=1)
    fit = fit_binary(x, y, **common)
    return [(fit, i) for i in range(len(targets))]


def dense_auc_table(results: Sequence[ProbeResult], split: str) -> dict[str, float]:
    """Leaf target -> dense-probe AUC on ``split``."""
    out: dict[str, float] = {}
    for r in results:
        if r.features == "dense":
            out.update(r.leaf_aucs(split))
    return out

"""Metric names the report and the comparison read from the registry, in one place.

The evaluation stage defines the names (every one is listed in ``medsae/eval/rows.py``); when it
renames a metric, change it here and both the HTML report and ``medsae exp compare`` follow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: Reconstruction metrics plotted against L0 across a sweep (scalar rows: no target, no N).
FVU = "fvu"
R2 = "r2_scalar_mean_study"
L0 = "l0_mean"

#: Splits in order of preference when one number per experiment is wanted.
PREFERRED_SPLITS: tuple[str, ...] = ("val", "test", "all", "train")

#: Splits in reading order for tables (the explanation pool, e.g. ``test+val``, after them).
SPLIT_ORDER: tuple[str, ...] = ("train", "val", "test", "all")

#: What each dead / alive figure counts. The same word covers different sets of slices (the split:
#: the train stage reports ``train``, the evaluation ``val`` and ``test``, the summarize stage the
#: explanation pool, e.g. ``test+val``) and different definitions (never firing on a whole split vs
#: the study's per-batch alive count), so a number is shown with its split and one of these lines.
DEAD_ALIVE_DEFINITIONS: dict[str, str] = {
    "dead_fraction": "share of latents that never fire (activation > 1e-8) on any slice of the split",
    "n_dead": "number of latents that never fire (activation > 1e-8) on any slice of the split",
    "latents_dead": "share of latents that never fire on any slice of the explanation pool (the split named)",
    "latents_too_rare": "share of latents firing, but on too few pool slices or patients to be explained",
    "latents_live": "share of latents eligible for explanation (fire often enough, not dense)",
    "latents_dense": "share of latents firing on more than interpret.dense_frequency of the pool",
    "dense_fraction": "share of latents firing on more than 10 % of the split's slices",
    "alive_per_batch_study": "the study's alive count: latents firing at least once in a 2,048-slice batch, "
    "averaged over batches (a count, not a dead-latent share)",
}

#: Definitions of the other metrics a model card or summary shows next to them.
METRIC_DEFINITIONS: dict[str, str] = {
    FVU: "fraction of variance unexplained, per-dimension means (1 - R²)",
    L0: "mean number of firing latents per slice",
    R2: "the study's R²: one scalar mean over each 2,048-slice batch (inflated)",
    **DEAD_ALIVE_DEFINITIONS,
}

#: Scalar metrics of the train and evaluate stages that a SAELens model card lists, in this order.
CARD_METRICS: tuple[str, ...] = (FVU, L0, "dead_fraction", "n_dead", "alive_per_batch_study")


def metric_definition(name: str, split: str | None = None) -> str:
    """One line saying what ``name`` measures (and on which slices, when ``split`` is given)."""
    text = METRIC_DEFINITIONS.get(name, name)
    return f"{text} [{split}]" if split else text


def preferred_split(splits: Iterable[str | None]) -> str | None:
    """The first of :data:`PREFERRED_SPLITS` among ``splits``, else the alphabetically first one."""
    present = sorted({s for s in splits if isinstance(s, str)})
    for split in PREFERRED_SPLITS:
        if split in present:
            return split
    return present[0] if present else None


#: The headline explanation score (Pearson r of simulated vs true activations).
HEADLINE_SCORE = "pearson"

#: Order of score methods in plots and tables (others follow alphabetically); the plot shows the
#: first three present.
SCORE_METHOD_ORDER: tuple[str, ...] = (
    HEADLINE_SCORE,
    "detection_bacc",
    "auroc",
    "spearman",
    "detection_auroc",
)

#: Explanation rows of this kind are LLM explanations; any other kind is a baseline.
EXPLANATION_KIND = "explanation"

#: Value of a :class:`KeyMetric` filter that matches any value (SQL: no condition).
ANY = "*"


@dataclass(frozen=True)
class KeyMetric:
    """One column of ``medsae exp compare``: ``agg(value)`` over the rows matching every filter.

    ``name`` is a ``metrics.name`` or, when ``source`` is ``"explanations"``, an
    ``explanation_scores.method`` (mean over the experiment's LLM explanations, baselines
    excluded). ``split``, ``target`` and ``n_features`` filter those columns: a value means
    equality, a tuple means any of them, ``None`` means SQL NULL and :data:`ANY` no filter.
    """

    column: str
    name: str
    label: str = ""
    split: str | None = "val"
    target: str | tuple[str, ...] | None = None
    n_features: int | None | str = None
    agg: str = "avg"
    source: str = "metrics"


#: The side-by-side table of ``medsae exp compare`` (validation split, as the study reports);
#: adjust freely: one entry, one column.
KEY_METRICS: tuple[KeyMetric, ...] = (
    KeyMetric("fvu", FVU, "FVU"),
    KeyMetric("r2_study", R2, "R² (study)"),
    KeyMetric("l0", L0, "L0"),
    KeyMetric("dead_fraction", "dead_fraction", "dead (never fire on val)"),
    KeyMetric("probe_auc_dense", "probe_auc_dense_mean", "probe AUC dense"),
    KeyMetric("probe_auc_sparse", "probe_auc_sparse_mean", "probe AUC sparse"),
    KeyMetric("recovery_10", "recovery_mean", "recovery@10", n_features=10),
    KeyMetric("mono_config", "mono_config_top10", "monosemanticity"),
    KeyMetric(
        "retrieval_precision",
        "retrieval_precision_sparse",
        "retrieval precision@K=5",
        target=("modality", "plane", "body_region"),
        n_features=5,
    ),
    KeyMetric("explanation_score", HEADLINE_SCORE, "explanation r", split=None, source="explanations"),
)


def listed_metrics(key_metrics: tuple[KeyMetric, ...] = KEY_METRICS) -> tuple[KeyMetric, ...]:
    """The key metrics ``medsae exp list`` shows: those that are one scalar ``metrics`` row per split."""
    return tuple(k for k in key_metrics if k.source == "metrics" and k.target is None and k.n_features is None)

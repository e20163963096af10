"""Metric names the report and the comparison read from the registry, in one place.

The evaluation stage defines the names (``medsae/eval``); when it renames a metric, change it here
and both the HTML report and ``medsae exp compare`` follow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: Reconstruction metrics plotted against L0 across a sweep.
FVU = "fvu"
R2 = "r2"
L0 = "l0"

#: Splits in order of preference when one number per experiment is wanted.
PREFERRED_SPLITS: tuple[str, ...] = ("val", "test", "all", "train")



def preferred_split(splits: Iterable[str | None]) -> str | None:
    """The first of :data:`PREFERRED_SPLITS` among ``splits``, else the alphabetically first one."""
    present = sorted({s for s in splits if isinstance(s, str)})
    for split in PREFERRED_SPLITS:
        if split in present:
            return split
    return present[0] if present else None


#: The headline explanation score (Pearson r of simulated vs true activations).
HEADLINE_SCORE = "pearson"

#: Explanation rows of this kind are LLM explanations; any other kind is a baseline.
EXPLANATION_KIND = "explanation"


@dataclass(frozen=True)
class KeyMetric:
    """One column of ``medsae exp compare``.

    ``name`` is a metric name (``metrics.name``) or, when ``source`` is ``"explanations"``, a score
    method (``explanation_scores.method``). ``split`` selects one split (``None``: the first of
    :data:`PREFERRED_SPLITS` that the experiment has is not attempted in SQL; the value must come
    from rows with exactly this split). ``target`` / ``n_features`` filter those columns (``"*"``
    means any value, ``None`` means SQL NULL). ``agg`` combines several matching rows.
    """

    column: str
    name: str
    split: str | None = "val"
    target: str | None = None
    n_features: int | None | str = None
    agg: str = "avg"
    source: str = "metrics"
    label: str = ""


#: The side-by-side table of ``medsae exp compare``; adjust freely (one entry, one column).
KEY_METRICS: tuple[KeyMetric, ...] = (
    KeyMetric("fvu", FVU, label="FVU"),
    KeyMetric("r2", R2, label="R² (study)"),
    KeyMetric("l0", L0, label="L0"),
    KeyMetric("dead_fraction", "dead_fraction", label="dead"),
    KeyMetric("probe_auc_dense", "probe_auc_dense", target="*", label="probe AUC dense"),
    KeyMetric("probe_auc_sparse", "probe_auc_sparse", target="*", label="probe AUC sparse"),
    KeyMetric("recovery_10", "recovery", target="*", n_features=10, label="recovery@10"),
    KeyMetric("mono_config", "monosemanticity_top50_mean", label="monosemanticity"),
    KeyMetric("retrieval_precision", "retrieval_precision", target="*", label="retrieval precision"),
    KeyMetric(
        "explanation_score", HEADLINE_SCORE, split=None, source="explanations", label="explanation r"
    ),
)

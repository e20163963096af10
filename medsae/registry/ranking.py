"""The study's configuration ranking (docs/method.md#ranking) as SQL over the registry.

It lives in the registry layer because the schema's ``config_ranking`` view is built from it
(:mod:`medsae.eval.ranking` re-exports it for the evaluation side).

For a set of experiments that ran the evaluate stage, within each group sharing one embed stage
(the study ranks per base model; here: per embedding artifact, i.e. same backbone and data):

1. ``rank_mono`` = rank of the monosemanticity score, descending (ties get the lowest rank, as
   pandas ``method="min"``). Default ``mono_config_top10`` (the study's public code); the shipped
   ranking used ``monosemanticity_top50_mean``.
2. ``rank_perf`` = rank of ``recovery_mean_n_features`` (mean number of latents needed to reach
   50 ... 100 % of the dense probe AUC; fewer is better), ascending.
3. ``rank_combined = (rank_mono + rank_perf) / 2``; ``final_rank`` = its rank (ties -> lowest).

Experiments lacking a score sort last. Both scores are read from the ``val`` rows of the
evaluate stage's metrics (target and n_features NULL).
"""

from __future__ import annotations

from collections.abc import Sequence

MONO_METRICS = ("mono_config_top10", "monosemanticity_top50_mean")
PERF_METRIC = "recovery_mean_n_features"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def ranking_sql(
    experiments: Sequence[str] | None = None,
    split: str = "val",
    mono_metric: str = "mono_config_top10",
    per_embedding: bool = True,
) -> str:
    """A SELECT returning one row per experiment: ``experiment, experiment_id, evaluate_key,
    embed_key, mono_score, mean_n_features, n_targets, rank_mono, rank_perf, rank_combined,
    final_rank``. ``experiments`` restricts the ranked set (by name) before ranking;
    ``per_embedding=False`` ranks all of them together."""
    if mono_metric not in MONO_METRICS:
        raise ValueError(f"mono_metric must be one of {', '.join(MONO_METRICS)}")
    where = ""
    if experiments is not None:
        names = ", ".join(_quote(n) for n in experiments) or "NULL"
        where = f"WHERE e.name IN ({names})"
    part = "PARTITION BY embed_key " if per_embedding else ""
    return f"""WITH ev AS (
    SELECT e.name AS experiment, e.experiment_id, es.stage_key AS evaluate_key,
           coalesce(emb.stage_key, '') AS embed_key
    FROM experiments e
    JOIN experiment_stages es ON es.experiment_id = e.experiment_id AND es.kind = 'evaluate'
    LEFT JOIN experiment_stages emb ON emb.experiment_id = e.experiment_id AND emb.kind = 'embed'
    {where}
), scores AS (
    SELECT ev.experiment, ev.experiment_id, ev.evaluate_key, ev.embed_key,
           max(m.value) FILTER (WHERE m.name = {_quote(mono_metric)}) AS mono_score,
           max(m.value) FILTER (WHERE m.name = {_quote(PERF_METRIC)}) AS mean_n_features,
           max(m.n) FILTER (WHERE m.name = {_quote(PERF_METRIC)}) AS n_targets
    FROM ev LEFT JOIN metrics m
      ON m.stage_key = ev.evaluate_key AND m.split = {_quote(split)}
     AND m.target IS NULL AND m.n_features IS NULL
    GROUP BY ev.experiment, ev.experiment_id, ev.evaluate_key, ev.embed_key
), ranked AS (
    SELECT *,
           rank() OVER ({part}ORDER BY mono_score DESC NULLS LAST) AS rank_mono,
           rank() OVER ({part}ORDER BY mean_n_features ASC NULLS LAST) AS rank_perf
    FROM scores
)
SELECT *, (rank_mono + rank_perf) / 2.0 AS rank_combined,
       rank() OVER ({part}ORDER BY (rank_mono + rank_perf) / 2.0) AS final_rank
FROM ranked
ORDER BY embed_key, final_rank, experiment"""


#: The view to add to ``medsae.registry.schema.VIEWS``.
RANKING_VIEW = "CREATE OR REPLACE VIEW config_ranking AS\n" + ranking_sql()

"""``compare_experiments``: the key metrics of several experiments side by side, in one SQL query.

The query is generated from :data:`medsae.report.names.KEY_METRICS` with the experiment names
inlined as SQL literals, so the text ``medsae exp compare --show-sql`` prints runs as printed
(``medsae exp compare A B --show-sql | medsae sql -``). A name means its latest registration;
``NAME@HASH`` one registration (written into the SQL with the 12-character hash
``medsae exp list`` shows).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from medsae.errors import MedsaeError
from medsae.registry import Registry, queries
from medsae.registry.queries import SHOWN_HASH
from medsae.report.names import ANY, EXPLANATION_KIND, KEY_METRICS, KeyMetric

_AGGS = {"avg", "min", "max", "median", "count"}


def _literal(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _condition(column: str, value: Any) -> str | None:
    if value == ANY:
        return None
    if value is None:
        return f"{column} IS NULL"
    if isinstance(value, tuple):
        return f"{column} IN ({', '.join(_literal(v) for v in value)})"
    return f"{column} = {_literal(value)}"


def _metric_column(k: KeyMetric) -> str:
    """``agg(value) FILTER (WHERE ...) AS column`` over metric rows ``m`` or score rows ``x``."""
    if k.agg not in _AGGS:
        raise ValueError(f"KeyMetric {k.column}: unknown aggregate {k.agg}")
    if k.source == "explanations":
        if k.split not in (None, ANY):
            raise ValueError(f"KeyMetric {k.column}: explanation scores have no split")
        return f"  {k.agg}(x.value) FILTER (WHERE x.method = {_literal(k.name)}) AS {k.column}"
    if k.source != "metrics":
        raise ValueError(f"KeyMetric {k.column}: unknown source {k.source}")
    conds = [f"m.name = {_literal(k.name)}"]
    for column, value in (("m.split", k.split), ("m.target", k.target), ("m.n_features", k.n_features)):
        cond = _condition(column, value)
        if cond:
            conds.append(cond)
    return f"  {k.agg}(m.value) FILTER (WHERE {' AND '.join(conds)}) AS {k.column}"


def compare_sql(names: list[str], key_metrics: tuple[KeyMetric, ...] = KEY_METRICS, split: str | None = None) -> str:
    """The comparison query for ``names`` (in that order), one column per key metric.

    ``split`` replaces the split of every key metric that has one (default: each metric's own).
    """
    if split is not None:
        key_metrics = tuple(replace(k, split=split) if k.split not in (None, ANY) else k for k in key_metrics)
    values = ", ".join(f"({_literal(n)}, {i})" for i, n in enumerate(names))
    metric_cols = [_metric_column(k) for k in key_metrics if k.source == "metrics"]
    score_cols = [k for k in key_metrics if k.source == "explanations"]
    sql = f"""WITH wanted(name, ord) AS (VALUES {values}),
chosen AS (  -- the latest registration of each name (NAME@HASH: the one whose id starts with HASH)
  SELECT e.experiment_id, w.name, w.ord FROM experiments e JOIN wanted w
    ON w.name = e.name OR w.name = e.name || '@' || left(e.experiment_id, {SHOWN_HASH})
  QUALIFY row_number() OVER (PARTITION BY w.ord ORDER BY e.created_at DESC) = 1
),
metric_cols AS (
  SELECT c.name AS experiment, c.ord{"".join("," + chr(10) + col for col in metric_cols)}
  FROM chosen c
  LEFT JOIN experiment_stages es ON es.experiment_id = c.experiment_id
  LEFT JOIN metrics m ON m.stage_key = es.stage_key
  GROUP BY c.name, c.ord
)"""
    if not score_cols:
        return sql + "\nSELECT * EXCLUDE (ord) FROM metric_cols ORDER BY ord"
    score_select = ",\n".join(_metric_column(k) for k in score_cols)
    return (
        sql
        + f""",
x AS (  -- scores of LLM explanations of each experiment's SAE latents (baselines excluded)
  SELECT c.name AS experiment, sc.method, sc.value
  FROM chosen c
  JOIN experiment_stages es ON es.experiment_id = c.experiment_id AND es.kind = 'train'
  JOIN explanations ex ON ex.sae_key = es.stage_key AND ex.kind = {_literal(EXPLANATION_KIND)}
  JOIN explanation_scores sc ON sc.explanation_id = ex.explanation_id
),
score_cols AS (
  SELECT x.experiment,
{score_select}
  FROM x GROUP BY x.experiment
)
SELECT mc.* EXCLUDE (ord){"".join(f", s.{k.column}" for k in score_cols)}
FROM metric_cols mc LEFT JOIN score_cols s ON s.experiment = mc.experiment
ORDER BY mc.ord"""
    )


def compare_experiments(
    registry: Registry, names: list[str], split: str | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Run :func:`compare_sql` for ``names``; one row per experiment, in the order given.

    Each name is looked up first (:func:`medsae.registry.queries.find_experiment`): an unknown
    name or an ambiguous ``NAME@HASH`` is a one-line :class:`MedsaeError` listing the candidates.
    """
    if not names:
        raise MedsaeError("compare: name at least one experiment")
    names = list(dict.fromkeys(_pinned(registry, n) for n in names))
    sql = compare_sql(names, split=split)
    return sql, queries.rows(registry, sql)


def _pinned(registry: Registry, name: str) -> str:
    """``name`` if it names experiments as is, else ``NAME@HASH`` with the 12-character hash."""
    row = queries.find_experiment(registry, name)
    return name if row["name"] == name else f"{row['name']}@{row['experiment_id'][:SHOWN_HASH]}"


def column_labels(key_metrics: tuple[KeyMetric, ...] = KEY_METRICS) -> dict[str, str]:
    """Result column -> human label (for the CLI table)."""
    return {"experiment": "experiment", **{k.column: k.label or k.column for k in key_metrics}}

"""Read what the report shows about one experiment out of the registry (read-only queries only).

Every function takes an open read-only DuckDB connection and returns plain Python data or pandas
frames; nothing here renders. Missing stages give empty results, so a report can be built at any
point of an experiment's life (after ``train`` only, before ``interpret``...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pandas as pd

from medsae.registry import queries
from medsae.report.names import EXPLANATION_KIND, FVU, L0, R2, preferred_split


@dataclass
class ExperimentRecord:
    """An ``experiments`` row with its stages (kind -> ``stages`` row)."""

    row: dict[str, Any]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def experiment_id(self) -> str:
        return self.row["experiment_id"]

    @property
    def name(self) -> str:
        return self.row["name"]

    def key(self, kind: str) -> str | None:
        stage = self.stages.get(kind)
        return stage["stage_key"] if stage else None

    def artifact_dir(self, kind: str) -> str | None:
        stage = self.stages.get(kind)
        return stage.get("artifact_dir") if stage else None


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    cur = con.execute(sql, params or [])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def _frame(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> pd.DataFrame:
    return con.execute(sql, params or []).df()


def load_experiment(con: duckdb.DuckDBPyConnection, name: str) -> ExperimentRecord:
    """The experiment ``name`` (or ``NAME@HASH``) and its stages; a one-line error lists candidates if absent."""
    row = queries.find_experiment(con, name)
    stages = queries.experiment_stages(con, row["experiment_id"])
    for s in stages:  # stored next to the registry file: absolute here
        s["artifact_dir"] = str(s.pop("folder")) if s["folder"] is not None else None
    return ExperimentRecord(row=row, stages={s["kind"]: s for s in stages})


def experiment_metrics(con: duckdb.DuckDBPyConnection, exp: ExperimentRecord) -> pd.DataFrame:
    """Every ``metrics`` row of the experiment's stages, with the stage kind."""
    return _frame(
        con,
        """SELECT es.kind AS stage, m.split, m.name, m.target, m.n_features, m.value, m.n
           FROM experiment_stages es JOIN metrics m ON m.stage_key = es.stage_key
           WHERE es.experiment_id = ?
           ORDER BY es.kind, m.name, m.target NULLS FIRST, m.n_features NULLS FIRST, m.split""",
        [exp.experiment_id],
    )


def sweep_points(
    con: duckdb.DuckDBPyConnection, exp: ExperimentRecord, shared_embeddings: bool = False
) -> pd.DataFrame:
    """FVU, R² and L0 (scalar rows, one split) of every experiment in the same sweep as ``exp`` (and, with
    ``shared_embeddings``, of every experiment that trained on ``exp``'s embed stage).

    One row per experiment name (its latest registration; ``exp`` itself for its own name), on one split
    (:func:`preferred_split`; a metric that split lacks comes from any split). Columns: experiment,
    split, fvu, r2, l0, current (bool), arch. An experiment outside any sweep gives its own row only.
    """
    frame = _frame(
        con,
        """WITH me AS (SELECT sweep_name FROM experiments WHERE experiment_id = ?),
           my_embed AS (SELECT stage_key FROM experiment_stages WHERE experiment_id = ? AND kind = 'embed'),
           related AS (
             SELECT e.* FROM experiments e
             WHERE e.experiment_id = ?
                OR (e.sweep_name IS NOT NULL AND e.sweep_name = (SELECT sweep_name FROM me))
                OR (? AND e.experiment_id IN (SELECT es.experiment_id FROM experiment_stages es
                                              WHERE es.kind = 'embed' AND es.stage_key IN (SELECT * FROM my_embed)))
             QUALIFY row_number() OVER (
               PARTITION BY e.name ORDER BY (e.experiment_id = ?) DESC, e.created_at DESC, e.experiment_id) = 1)
           SELECT r.name AS experiment, r.experiment_id = ? AS current, r.spec_json, m.split, m.name AS metric,
                  avg(m.value) AS value
           FROM related r JOIN experiment_stages es USING (experiment_id) JOIN metrics m ON m.stage_key = es.stage_key
           WHERE m.name IN (?, ?, ?) AND m.target IS NULL AND m.n_features IS NULL AND m.value IS NOT NULL
           GROUP BY ALL""",
        [exp.experiment_id] * 3 + [shared_embeddings] + [exp.experiment_id] * 2 + [FVU, R2, L0],
    )
    columns = ["experiment", "split", FVU, R2, L0, "current", "arch"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for name, group in frame.groupby("experiment", sort=True):
        split = preferred_split(group["split"])
        chosen = group[group["split"] == split] if split is not None else group[group["split"].isna()]
        values = {}
        for metric in (FVU, R2, L0):
            found = chosen.loc[chosen["metric"] == metric, "value"]
            found = found if not found.empty else group.loc[group["metric"] == metric, "value"]
            values[metric] = float(found.iloc[0]) if not found.empty else None
        out.append(
            {
                "experiment": name,
                "split": split,
                **values,
                "current": bool(group["current"].iloc[0]),
                "arch": str((_loads(group["spec_json"].iloc[0]).get("sae") or {}).get("arch", "")),
            }
        )
    return pd.DataFrame(out, columns=columns)


def latents_frame(con: duckdb.DuckDBPyConnection, exp: ExperimentRecord) -> pd.DataFrame:
    """The ``latents`` rows of the experiment's summarize stage (empty frame if none)."""
    key = exp.key("summarize")
    if key is None:
        return pd.DataFrame()
    return _frame(con, "SELECT * EXCLUDE (stage_key) FROM latents WHERE stage_key = ? ORDER BY latent", [key])


def explanations_frame(con: duckdb.DuckDBPyConnection, exp: ExperimentRecord) -> pd.DataFrame:
    """Every explanation (and baseline) made on the experiment's own example sets, all versions.

    Rows are those of the experiment's summarize stage, not of other experiments sharing its SAE.
    """
    summarize_key = exp.key("summarize")
    if summarize_key is None:
        return pd.DataFrame()
    return _frame(
        con,
        """SELECT explanation_id, stage_key, latent, explainer_model, template_hash, params_json,
                  example_set_id, text, status, kind, created_at
           FROM explanations WHERE stage_key = ?
           ORDER BY latent, (kind = ?) DESC, created_at, explanation_id""",
        [summarize_key, EXPLANATION_KIND],
    )


#: A degenerate score (its predictions do not depend on the explanation, medsae.interp.scorers.sanity)
#: is shown under its own method name, so it stays visible but never enters a method's mean.
DEGENERATE_SUFFIX = " (degenerate)"


def scores_frame(con: duckdb.DuckDBPyConnection, exp: ExperimentRecord) -> pd.DataFrame:
    """Scores of the explanations returned by :func:`explanations_frame`, with their group label.

    Degenerate scores get ``method`` + :data:`DEGENERATE_SUFFIX` and ``degenerate`` true.
    """
    summarize_key = exp.key("summarize")
    if summarize_key is None:
        return pd.DataFrame()
    degenerate = "coalesce(s.extra_json, '') LIKE '%\"degenerate\":%'"  # also in registries without the column
    return _frame(
        con,
        f"""SELECT s.explanation_id, e.latent, e.explainer_model, e.kind,
                  CASE WHEN {degenerate} THEN s.method || ? ELSE s.method END AS method, s.scorer_model,
                  s.scorer_mode, s.value, s.n, s.n_missing, s.chance, s.ci_low, s.ci_high, s.p_value,
                  {degenerate} AS degenerate
           FROM explanation_scores s JOIN explanations e USING (explanation_id)
           WHERE e.stage_key = ?
           ORDER BY e.latent, s.method, s.scorer_model""",
        [DEGENERATE_SUFFIX, summarize_key],
    )


def explain_sets(con: duckdb.DuckDBPyConnection, exp: ExperimentRecord, latents: list[int]) -> dict[int, dict]:
    """The 'explain' example set of each latent (slice_ids, activations, roles), if summarize ran."""
    key = exp.key("summarize")
    if key is None or not latents:
        return {}
    rows = _rows(
        con,
        """SELECT latent, set_id, slice_ids, activations, roles FROM example_sets
           WHERE stage_key = ? AND purpose = 'explain' AND list_contains(?, latent)
           ORDER BY latent, set_id""",
        [key, [int(x) for x in latents]],
    )
    out: dict[int, dict] = {}
    for r in rows:
        out.setdefault(int(r["latent"]), r)
    return out


def slice_metadata(con: duckdb.DuckDBPyConnection, exp: ExperimentRecord, slice_ids: list[int]) -> pd.DataFrame:
    """``slices`` rows (indexed by slice_id) plus their three largest structures, for the cards."""
    key = exp.key("slices")
    if key is None or not slice_ids:
        return pd.DataFrame()
    ids = sorted({int(s) for s in slice_ids})
    meta = _frame(
        con,
        """WITH ids AS (SELECT unnest(?::BIGINT[]) AS slice_id),
           ranked AS (
             SELECT ss.slice_id, ss.structure,
                    row_number() OVER (PARTITION BY ss.slice_id ORDER BY ss.pixels DESC, ss.structure) AS rn
             FROM slice_structures ss JOIN ids USING (slice_id) WHERE ss.slices_key = ?),
           top AS (
             SELECT slice_id, string_agg(structure, ', ' ORDER BY rn) AS top_structures
             FROM ranked WHERE rn <= 3 GROUP BY slice_id)
           SELECT s.*, top.top_structures
           FROM slices s JOIN ids USING (slice_id) LEFT JOIN top USING (slice_id)
           WHERE s.slices_key = ?""",
        [ids, key, key],
    )
    return meta.set_index("slice_id", drop=False) if not meta.empty else meta


@dataclass
class GroundingData:
    """What the cards show of a ground stage: best structure rows, token-grid maps, structures per slice."""

    rows: dict[int, dict[str, Any]] = field(default_factory=dict)  # latent -> latent_grounding row
    maps: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # latent -> (slice ids, maps [n, h, w])
    present: dict[int, set[str]] = field(default_factory=dict)  # slice_id -> structures with pixels in it


def grounding(con: duckdb.DuckDBPyConnection, exp: ExperimentRecord, latents: list[int]) -> GroundingData:
    """The ground stage's rows and maps for ``latents`` (empty when the experiment has no ground stage)."""
    key, folder, slices_key = exp.key("ground"), exp.artifact_dir("ground"), exp.key("slices")
    if key is None or folder is None or slices_key is None or not latents:
        return GroundingData()
    rows = {int(r["latent"]): r for r in queries.latent_grounding(con, key, latents)}
    maps = queries.ground_maps(folder, list(rows))
    ids = sorted({int(s) for sids, _ in maps.values() for s in sids})
    present: dict[int, set[str]] = {}
    for r in queries.slice_structure_rows(con, slices_key, ids):
        present.setdefault(int(r["slice_id"]), set()).add(r["structure"])
    return GroundingData(rows, maps, present)


def _loads(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}

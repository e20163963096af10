"""The registry's read layer: experiments by name, their stages and folders, key metrics, explanations.

Every command and stage that needs "the experiment called X", "its stage folders" or "its key
metrics" asks here, so those questions have one answer (and one error message) everywhere.

* Every function takes a :class:`~medsae.registry.db.Registry` (each call opens and closes one
  read-only connection) or an open DuckDB connection (the report reads many things in one).
* Reading a registry file that does not exist raises the one "no registry here yet" message.
* An experiment is named ``NAME`` (its latest registration) or ``NAME@HASH-PREFIX`` (one
  registration: a prefix of its experiment id, the hash ``medsae exp list`` shows). An unknown name
  or an ambiguous prefix is one line that lists the candidates.

Nothing here writes, and nothing here imports a stage package: the registry is the bottom layer
that ``data``, ``sae``, ``eval``, ``interp`` and ``report`` read through.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import duckdb

from medsae.errors import MedsaeError, MissingInputError
from medsae.paths import connection_file, resolve_stored
from medsae.registry.db import Registry, RegistryMissingError

#: A registry file or an open (read-only) connection to one.
Source = Registry | duckdb.DuckDBPyConnection

#: Shortest hash prefix accepted in ``NAME@PREFIX`` (shorter ones would match by accident).
MIN_PREFIX = 4
#: Hash characters ``medsae exp list`` shows (and ambiguity messages print).
SHOWN_HASH = 12


# -- plumbing -------------------------------------------------------------------------------------


def require(registry: Registry) -> None:
    """Raise the one "no registry here yet" error unless the registry file exists."""
    if not registry.path.exists():
        raise RegistryMissingError(f"{registry.path}: no registry here yet (run `medsae exp run SPEC` first)")


def source_path(source: Source) -> Path | None:
    """The registry file behind ``source`` (None for an in-memory connection)."""
    return source.path if isinstance(source, Registry) else connection_file(source)


def rows(source: Source, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """Rows of one read-only query as dicts; a missing registry file is an error, not an empty list."""
    if isinstance(source, Registry):
        require(source)
        with source.read() as con:
            return rows(con, sql, params)
    cur = source.execute(sql, list(params or []))
    columns = [d[0] for d in cur.description]
    return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]


def has_table(source: Source, table: str) -> bool:
    """Whether the registry has ``table`` (tables added by later migrations may be absent)."""
    return bool(rows(source, "SELECT 1 FROM duckdb_tables() WHERE table_name = ?", [table]))


# -- experiments ----------------------------------------------------------------------------------


def _registration(row: dict[str, Any]) -> str:
    return f"{row['name']}@{row['experiment_id'][:SHOWN_HASH]} ({str(row['created_at'])[:16]})"


def _unknown(source: Source, name: str) -> MedsaeError:
    names = [r["name"] for r in rows(source, "SELECT DISTINCT name FROM experiments ORDER BY name")]
    close = difflib.get_close_matches(name.split("@")[0], names, n=3, cutoff=0.6)
    if close:
        hint = "did you mean " + " or ".join(f"'{n}'" for n in close) + "? `medsae exp list` shows them all"
    elif names:
        hint = "known: " + ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    else:
        hint = "the registry holds no experiment yet"
    where = source_path(source)
    return MedsaeError(f"{where}: no experiment named '{name}' (that name is not in the registry; {hint})")


def find_experiment(source: Source, name: str) -> dict[str, Any]:
    """The ``experiments`` row named ``name`` (latest registration) or ``name@hash-prefix``.

    One-line errors: an unknown name (with close names), a prefix matching no registration (with
    that name's registrations) or several (listed).
    """
    found = rows(source, "SELECT * FROM experiments WHERE name = ? ORDER BY created_at DESC LIMIT 1", [name])
    if found:
        return found[0]
    base, sep, prefix = name.rpartition("@")
    if not sep or not base:
        raise _unknown(source, name)
    prefix = prefix.lower()
    if not re.fullmatch(rf"[0-9a-f]{{{MIN_PREFIX},64}}", prefix):  # not NAME@HASH (sweep points contain '@')
        raise _unknown(source, name)
    same_name = rows(source, "SELECT * FROM experiments WHERE name = ? ORDER BY created_at DESC", [base])
    if not same_name:
        raise _unknown(source, base)
    matches = [r for r in same_name if r["experiment_id"].startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(_registration(r) for r in (matches or same_name)[:6])
    if matches:
        raise MedsaeError(f"{name}: the prefix matches {len(matches)} registrations: {listed}; give more characters")
    raise MedsaeError(f"{name}: no registration of '{base}' has a hash starting '{prefix}' (there are: {listed})")


def list_experiments(source: Source) -> list[dict[str, Any]]:
    """Every registration, oldest first: id, name, hash, sweep, created_at, stages_done / stages."""
    return rows(
        source,
        """SELECT e.experiment_id, e.name, e.spec_hash, e.sweep_name, e.created_at,
                  count(s.stage_key) AS stages_done, count(es.kind) AS stages
           FROM experiments e LEFT JOIN experiment_stages es USING (experiment_id)
           LEFT JOIN stages s ON s.stage_key = es.stage_key AND s.status = 'done'
           GROUP BY ALL ORDER BY e.created_at, e.name, e.experiment_id""",
    )


def tags_by_experiment(source: Source) -> dict[str, list[str]]:
    """experiment_id -> its tags (sorted); empty when the registry predates tags."""
    if not has_table(source, "experiment_tags"):
        return {}
    out: dict[str, list[str]] = {}
    for r in rows(source, "SELECT experiment_id, tag FROM experiment_tags ORDER BY experiment_id, tag"):
        out.setdefault(r["experiment_id"], []).append(r["tag"])
    return out


# -- stages and their folders ---------------------------------------------------------------------


def experiment_stages(source: Source, experiment_id: str) -> list[dict[str, Any]]:
    """Every planned stage of the experiment, run or not, with its ``stages`` row (NULLs if not run).

    Keys: kind, stage_key, status ('not run' if absent), code_version, params_json, upstream_keys,
    started_at, finished_at, seconds, device, summary_json, artifact_dir (as stored) and ``folder``
    (the stage folder as an absolute path, or None).
    """
    found = rows(
        source,
        """SELECT es.kind, es.stage_key, coalesce(s.status, 'not run') AS status, s.code_version,
                  s.params_json, s.upstream_keys, s.started_at, s.finished_at, s.seconds, s.device,
                  s.artifact_dir, s.summary_json
           FROM experiment_stages es LEFT JOIN stages s ON s.stage_key = es.stage_key
           WHERE es.experiment_id = ? ORDER BY es.kind""",
        [experiment_id],
    )
    registry_file = source_path(source)
    for r in found:
        r["folder"] = resolve_stored(r["artifact_dir"], registry_file) if r["artifact_dir"] else None
    return found


def stage_folders(source: Source, experiment_id: str) -> dict[str, Path]:
    """kind -> folder of each completed stage of the experiment."""
    return {r["kind"]: r["folder"] for r in experiment_stages(source, experiment_id) if r["folder"] is not None}


def experiment_stage_dirs(source: Source, name: str) -> dict[str, Path]:
    """kind -> folder of each completed stage of the experiment ``name`` (see :func:`find_experiment`)."""
    return stage_folders(source, find_experiment(source, name)["experiment_id"])


def stage_folder(source: Source, experiment: dict[str, Any], kind: str) -> Path:
    """The folder of the experiment's completed ``kind`` stage; one line if it has not run or is gone."""
    folder = stage_folders(source, experiment["experiment_id"]).get(kind)
    if folder is None:
        raise MissingInputError(
            f"experiment '{experiment['name']}': stage '{kind}' has not run (run `medsae exp run` first)"
        )
    if not folder.is_dir():
        raise MissingInputError(f"experiment '{experiment['name']}': {kind} folder {folder} is missing")
    return folder


# -- metrics --------------------------------------------------------------------------------------


def scalar_metrics(
    source: Source, experiment_id: str, kinds: Iterable[str] = ("train", "evaluate")
) -> list[dict[str, Any]]:
    """One-number metrics (no target, no N) of the experiment's ``kinds`` stages, timings left out.

    Keys: stage, split, metric, value, n. Unordered (callers order splits for reading).
    """
    kinds = list(kinds)
    return rows(
        source,
        """SELECT es.kind AS stage, m.split, m.name AS metric, m.value, m.n
           FROM experiment_stages es JOIN metrics m ON m.stage_key = es.stage_key
           WHERE es.experiment_id = ? AND list_contains(?, es.kind) AND m.target IS NULL
             AND m.n_features IS NULL AND m.name NOT LIKE 'seconds%'""",
        [experiment_id, kinds],
    )


def key_metrics(
    source: Source, experiment_ids: Sequence[str], names: Sequence[str], split: str = "val", kind: str = "evaluate"
) -> dict[str, dict[str, float]]:
    """experiment_id -> metric -> value of the ``kind`` stage's scalar rows on ``split`` (the study reports val).

    Only that split: a number always describes the split its column names.
    """
    if not experiment_ids or not names:
        return {}
    found = rows(
        source,
        """SELECT es.experiment_id, m.name, avg(m.value) AS value
           FROM experiment_stages es JOIN metrics m ON m.stage_key = es.stage_key
           WHERE list_contains(?, es.experiment_id) AND es.kind = ? AND list_contains(?, m.name)
             AND m.split = ? AND m.target IS NULL AND m.n_features IS NULL AND m.value IS NOT NULL
           GROUP BY ALL""",
        [list(experiment_ids), kind, list(names), split],
    )
    out: dict[str, dict[str, float]] = {}
    for r in found:
        out.setdefault(r["experiment_id"], {})[r["name"]] = r["value"]
    return out


# -- explanations ---------------------------------------------------------------------------------


def stage_key(source: Source, experiment_id: str, kind: str) -> str | None:
    """The key of the experiment's ``kind`` stage (planned, done or not), or None."""
    found = rows(
        source, "SELECT stage_key FROM experiment_stages WHERE experiment_id = ? AND kind = ?", [experiment_id, kind]
    )
    return found[0]["stage_key"] if found else None


def explainer_summary(source: Source, experiment_id: str, method: str = "pearson") -> list[dict[str, Any]]:
    """Per explainer model: latents explained and the mean ``method`` score of its explanations.

    Only LLM explanations count (kind ``explanation``; baselines such as ``shuffled`` or
    ``best_attribute`` are not an explainer's score), only the latest version of each, only those
    made on this experiment's own example sets, and degenerate scores are left out of the mean.
    Keys: explainer_model, latents, mean_score, n_scores.
    """
    summarize = stage_key(source, experiment_id, "summarize")
    if summarize is None:
        return []
    return rows(
        source,
        """SELECT e.explainer_model, count(DISTINCT e.latent) AS latents,
                  avg(s.value) FILTER (WHERE s.method = ? AND coalesce(s.extra_json, '') NOT LIKE '%"degenerate":%')
                    AS mean_score,
                  count(s.value) FILTER (WHERE s.method = ? AND coalesce(s.extra_json, '') NOT LIKE '%"degenerate":%')
                    AS n_scores
           FROM latest_explanations e LEFT JOIN explanation_scores s USING (explanation_id)
           WHERE e.kind = 'explanation' AND e.stage_key = ?
           GROUP BY ALL ORDER BY e.explainer_model""",
        [method, method, summarize],
    )


def stage_explanations(source: Source, summarize_key: str) -> list[dict[str, Any]]:
    """Every explanation row (LLM explanations and baselines, any status) made on one summarize stage's sets."""
    return rows(
        source,
        """SELECT explanation_id, latent, sae_key, explainer_model, kind, status, text, example_set_id
           FROM explanations WHERE stage_key = ? ORDER BY latent, explanation_id""",
        [summarize_key],
    )


# -- the study's tables (`medsae study-table`) ---------------------------------------------------


def sweep_members(source: Source, sweep_name: str) -> list[str]:
    """experiment_id of the latest registration of each experiment of the sweep ``sweep_name``."""
    found = rows(
        source,
        """SELECT experiment_id FROM (
             SELECT experiment_id, name, created_at,
                    row_number() OVER (PARTITION BY name ORDER BY created_at DESC, experiment_id) AS rn
             FROM experiments WHERE sweep_name = ?) WHERE rn = 1 ORDER BY created_at, name""",
        [sweep_name],
    )
    return [r["experiment_id"] for r in found]


def evaluated_runs(source: Source, experiment_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Registrations whose evaluate stage is done (``experiment_ids``, or the latest of each name), oldest
    first, with what a study table reads: experiment_id, name, sweep_name, evaluate_key,
    eval_params_json, evaluate_summary_json, train_key, train_params_json, embed_key,
    embed_params_json, summarize_key (train / embed / summarize NULL when the experiment has none)."""
    chosen = (
        "SELECT experiment_id FROM (SELECT experiment_id, row_number() OVER "
        "(PARTITION BY name ORDER BY created_at DESC, experiment_id) AS rn FROM experiments) WHERE rn = 1"
        if experiment_ids is None
        else "SELECT unnest(?::VARCHAR[]) AS experiment_id"
    )
    return rows(
        source,
        f"""WITH chosen AS ({chosen}),
           stage_of AS (
             SELECT es.experiment_id, es.kind, es.stage_key, s.params_json, s.summary_json, s.status
             FROM experiment_stages es LEFT JOIN stages s ON s.stage_key = es.stage_key)
           SELECT e.experiment_id, e.name, e.sweep_name, e.created_at,
                  ev.stage_key AS evaluate_key, ev.params_json AS eval_params_json,
                  ev.summary_json AS evaluate_summary_json,
                  tr.stage_key AS train_key, tr.params_json AS train_params_json,
                  em.stage_key AS embed_key, em.params_json AS embed_params_json,
                  su.stage_key AS summarize_key
           FROM experiments e
           JOIN chosen USING (experiment_id)
           JOIN stage_of ev ON ev.experiment_id = e.experiment_id AND ev.kind = 'evaluate' AND ev.status = 'done'
           LEFT JOIN stage_of tr ON tr.experiment_id = e.experiment_id AND tr.kind = 'train'
           LEFT JOIN stage_of em ON em.experiment_id = e.experiment_id AND em.kind = 'embed'
           LEFT JOIN stage_of su ON su.experiment_id = e.experiment_id AND su.kind = 'summarize'
           ORDER BY e.created_at, e.name, e.experiment_id""",
        [] if experiment_ids is None else [list(experiment_ids)],
    )


def stage_metric_rows(
    source: Source, stage_keys: Sequence[str], names: Sequence[str], split: str = "val"
) -> list[dict[str, Any]]:
    """Metric rows ``names`` of the stages ``stage_keys`` on ``split``: stage_key, name, target,
    n_features, value, n."""
    if not stage_keys or not names:
        return []
    return rows(
        source,
        """SELECT stage_key, name, target, n_features, value, n FROM metrics
           WHERE list_contains(?, stage_key) AND list_contains(?, name) AND split = ?""",
        [list(stage_keys), list(names), split],
    )


def ranking_outcomes(source: Source, summarize_keys: Sequence[str]) -> list[dict[str, Any]]:
    """The 5-way ranking of each summarize stage's latest LLM explanations: summarize_key, n (ranking
    scores), n_ranked (with a rank), top1 / top2 (share of ranked explanations placed first / in the
    first two). Stages without ranking scores are absent. "Latest" is per stage, so two protocols
    run on one SAE (two summarize stages) never hide each other's explanations."""
    if not summarize_keys:
        return []
    return rows(
        source,
        """WITH latest AS (
             SELECT * FROM explanations
             QUALIFY row_number() OVER (PARTITION BY stage_key, latent, explainer_model, kind
                                        ORDER BY created_at DESC, explanation_id) = 1),
           ranked AS (
             SELECT e.stage_key, TRY_CAST(json_extract_string(s.extra_json, '$.rank') AS INTEGER) AS rank
             FROM latest e JOIN explanation_scores s USING (explanation_id)
             WHERE e.kind = 'explanation' AND s.method LIKE 'ranking%' AND list_contains(?, e.stage_key))
           SELECT stage_key AS summarize_key, count(*) AS n, count(rank) AS n_ranked,
                  avg(CASE WHEN rank = 1 THEN 1.0 ELSE 0.0 END) FILTER (WHERE rank IS NOT NULL) AS top1,
                  avg(CASE WHEN rank <= 2 THEN 1.0 ELSE 0.0 END) FILTER (WHERE rank IS NOT NULL) AS top2
           FROM ranked GROUP BY stage_key""",
        [list(summarize_keys)],
    )


# -- grounding ------------------------------------------------------------------------------------

#: The ground stage's token-grid activation maps (written by ``medsae.ground.stage``).
GROUND_MAPS_FILE = "activation_maps.npz"
#: The ground stage's latent x structure scores; ``best`` marks each latent's ``latent_grounding`` row.
GROUNDING_FILE = "grounding.parquet"


def best_structures(source: Source, ground_key: str) -> dict[int, str]:
    """latent -> best-grounded structure of one ground stage (its ``latent_grounding`` rows)."""
    return {int(r["latent"]): str(r["structure"]) for r in latent_grounding(source, ground_key)}


def folder_best_structures(folder: Path) -> dict[int, str]:
    """latent -> best-grounded structure, read from a finished ground stage's folder (no registry).

    The same pairs as :func:`best_structures` for that stage; a folder without the scores file (no
    latent grounded) gives an empty dict.
    """
    import pyarrow.parquet as pq

    path = Path(folder) / GROUNDING_FILE
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["latent", "structure", "best"]).to_pylist()
    return {int(r["latent"]): str(r["structure"]) for r in table if r["best"]}


def latent_grounding(source: Source, ground_key: str, latents: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """``latent_grounding`` rows (best structure and its scores) of one ground stage, by latent.

    Only ``latents`` when given; a registry from before the table existed gives no rows.
    """
    if not has_table(source, "latent_grounding"):
        return []
    where, params = "stage_key = ?", [ground_key]
    if latents is not None:
        where += " AND list_contains(?, latent)"
        params.append([int(x) for x in latents])
    return rows(source, f"SELECT * EXCLUDE (stage_key) FROM latent_grounding WHERE {where} ORDER BY latent", params)


def ground_maps(folder: Path, latents: Sequence[int]) -> dict[int, tuple[Any, Any]]:
    """latent -> (slice ids, token-grid maps ``[n, h, w]`` float32) of a ground stage's folder.

    The slices are the latent's top held-out slices, strongest pooled code first. Latents the
    stage did not ground are absent; a folder without the maps file gives an empty dict.
    """
    import numpy as np

    path = Path(folder) / GROUND_MAPS_FILE
    if not path.is_file():
        return {}
    with np.load(path) as data:
        stored = data["latents"]
        pos = {int(x): i for i, x in enumerate(stored)}
        wanted = [int(x) for x in latents if int(x) in pos]
        if not wanted:
            return {}
        at = np.asarray([pos[x] for x in wanted])
        ids, maps = data["slice_ids"][at], data["maps"][at]
    out = {}
    for j, latent in enumerate(wanted):
        keep = ids[j] >= 0  # -1 pads latents with fewer top slices
        out[latent] = (ids[j][keep].astype(np.int64), maps[j][keep].astype(np.float32))
    return out


def slice_structure_rows(source: Source, slices_key: str, slice_ids: Sequence[int]) -> list[dict[str, Any]]:
    """``slice_structures`` rows (slice_id, structure, pixels) of the slices ``slice_ids``."""
    if not slice_ids:
        return []
    return rows(
        source,
        """SELECT slice_id, structure, pixels FROM slice_structures
           WHERE slices_key = ? AND list_contains(?, slice_id) ORDER BY slice_id, structure""",
        [slices_key, [int(s) for s in slice_ids]],
    )


__all__ = [
    "Source",
    "evaluated_runs",
    "experiment_stage_dirs",
    "experiment_stages",
    "explainer_summary",
    "find_experiment",
    "ground_maps",
    "has_table",
    "key_metrics",
    "latent_grounding",
    "list_experiments",
    "ranking_outcomes",
    "require",
    "rows",
    "scalar_metrics",
    "slice_structure_rows",
    "source_path",
    "stage_folder",
    "stage_folders",
    "stage_key",
    "stage_metric_rows",
    "sweep_members",
    "tags_by_experiment",
]

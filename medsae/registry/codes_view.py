"""Activations in SQL: TEMP views over every encode stage's ``codes.parquet``.

The registry stores no activations; each encode stage folder holds a long table
``(slice_id, latent, value)`` sorted by latent (:mod:`medsae.sae.codes_table`). A view naming those
files cannot live in the registry file itself (the paths are machine-specific and the registry is
usually opened read-only), so :func:`register_code_views` creates per-connection TEMP views:

* ``experiment_codes``: every registered experiment that has an encode stage with a codes table:
  ``experiment, experiment_id, slice_id, latent, value, slices_key, encode_key``;
* ``codes``: the same rows for the latest registration of each name (the experiment that
  ``medsae exp show NAME`` shows), so ``WHERE experiment = 'demo'`` never mixes two SAEs.

Each view is a UNION ALL with one branch per (experiment, file) whose experiment columns are
constants: DuckDB drops the branches a ``WHERE experiment = ...`` excludes before reading any file,
and a ``latent = ...`` filter is pushed into the Parquet scan, where row-group statistics skip all
but the latent's row groups. Join ``slices`` / ``slice_structures`` on ``(slices_key, slice_id)``.

Sandboxed connections (``enable_external_access = false``) must allow :func:`allowed_dirs` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb

#: File name of an encode stage's long codes table (written by medsae.sae.codes_table, which
#: imports it from here: the registry layer imports no stage package).
CODES_TABLE = "codes.parquet"

VIEW_COLUMNS = ("experiment", "experiment_id", "slice_id", "latent", "value", "slices_key", "encode_key")
_EMPTY = (
    "SELECT NULL::VARCHAR AS experiment, NULL::VARCHAR AS experiment_id, NULL::BIGINT AS slice_id, "
    "NULL::INTEGER AS latent, NULL::FLOAT AS value, NULL::VARCHAR AS slices_key, NULL::VARCHAR AS encode_key "
    "WHERE false"
)


@dataclass(frozen=True)
class CodesSource:
    """One experiment's codes table."""

    experiment: str
    experiment_id: str
    encode_key: str
    slices_key: str | None
    path: Path
    latest: bool  # the newest registration of this name


def stage_dir(artifact_dir: str, registry_path: str | Path | None) -> Path:
    """A stage folder as recorded in ``stages.artifact_dir`` (relative paths: next to the registry file)."""
    from medsae.paths import resolve_stored

    return resolve_stored(artifact_dir, registry_path)


def code_sources(con: duckdb.DuckDBPyConnection, registry_path: str | Path | None = None) -> list[CodesSource]:
    """Experiments whose finished encode stage folder holds a codes table, oldest first."""
    rows = con.execute(
        """SELECT e.name, e.experiment_id, enc.stage_key, sl.stage_key, s.artifact_dir,
                  row_number() OVER (PARTITION BY e.name ORDER BY e.created_at DESC) = 1 AS latest
           FROM experiments e
           JOIN experiment_stages enc ON enc.experiment_id = e.experiment_id AND enc.kind = 'encode'
           JOIN stages s ON s.stage_key = enc.stage_key AND s.status = 'done'
           LEFT JOIN experiment_stages sl ON sl.experiment_id = e.experiment_id AND sl.kind = 'slices'
           ORDER BY e.created_at, e.name"""
    ).fetchall()
    sources = []
    for name, experiment_id, encode_key, slices_key, artifact_dir, latest in rows:
        if not artifact_dir:
            continue
        path = stage_dir(artifact_dir, registry_path) / CODES_TABLE
        if path.is_file():
            sources.append(CodesSource(name, experiment_id, encode_key, slices_key, path.resolve(), bool(latest)))
    return sources


def _literal(value: str | None) -> str:
    return "NULL::VARCHAR" if value is None else "'" + value.replace("'", "''") + "'"


def _branch(src: CodesSource) -> str:
    return (
        f"SELECT {_literal(src.experiment)} AS experiment, {_literal(src.experiment_id)} AS experiment_id, "
        f"slice_id, latent, value, {_literal(src.slices_key)} AS slices_key, "
        f"{_literal(src.encode_key)} AS encode_key FROM read_parquet({_literal(str(src.path))})"
    )


def views_sql(sources: list[CodesSource]) -> dict[str, str]:
    """view name -> its SELECT (an empty, typed SELECT when there is nothing to show)."""
    every = [_branch(s) for s in sources]
    latest = [_branch(s) for s in sources if s.latest]
    return {
        "experiment_codes": "\nUNION ALL ".join(every) or _EMPTY,
        "codes": "\nUNION ALL ".join(latest) or _EMPTY,
    }


def register_code_views(con: duckdb.DuckDBPyConnection, registry_path: str | Path | None = None) -> list[CodesSource]:
    """Create the TEMP views ``codes`` and ``experiment_codes`` on ``con`` (works on read-only connections)."""
    sources = code_sources(con, registry_path)
    for name, select in views_sql(sources).items():
        con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {select}")
    return sources


def allowed_dirs(con: duckdb.DuckDBPyConnection, registry_path: str | Path | None = None) -> list[str]:
    """Folders the views read (absolute, with a trailing slash, as DuckDB's ``allowed_directories`` wants)."""
    return sorted({str(s.path.parent) + "/" for s in code_sources(con, registry_path)})


__all__ = ["VIEW_COLUMNS", "CodesSource", "allowed_dirs", "code_sources", "register_code_views", "views_sql"]

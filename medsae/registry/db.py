"""Opening the DuckDB registry: short write transactions, bounded waits, read-only queries.

DuckDB allows one writing process OR any number of reading processes per file. medsae therefore
never keeps a connection open: every write opens the file, runs one transaction and closes it,
and every read (``medsae sql``, ``exp show``, ``report``) does the same with a read-only
connection. A process that finds the file locked by another retries with a short, jittered
backoff (so readers and writers interleave and neither starves) for ``MEDSAE_REGISTRY_TIMEOUT``
seconds (default 30) and then raises :class:`RegistryLockedError` with a one-line message. So
readers run while an ``exp run`` writes: they wait only while one of its short transactions is open.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from medsae.errors import MedsaeError
from medsae.registry.schema import MIGRATIONS, SCHEMA_VERSION, VIEWS
from medsae.stage import check_writable_file

DEFAULT_REGISTRY = "registry.duckdb"


class RegistryLockedError(MedsaeError):
    """Another process holds the registry's write lock for longer than we wait."""


class RegistryMissingError(MedsaeError):
    """A read was asked of a registry file that does not exist."""


def registry_path(explicit: str | Path | None = None) -> Path:
    """The registry file: ``explicit``, else ``$MEDSAE_REGISTRY``, else ``./registry.duckdb``."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("MEDSAE_REGISTRY") or DEFAULT_REGISTRY)


def _lock_timeout() -> float:
    return float(os.environ.get("MEDSAE_REGISTRY_TIMEOUT", "30"))


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text or "conflicting" in text or "already open" in text


#: Longest time this process waited for another process's registry lock (seconds; for benchmarks).
longest_wait = 0.0


def _connect(path: Path, read_only: bool, timeout: float | None = None) -> duckdb.DuckDBPyConnection:
    global longest_wait
    start = time.monotonic()
    deadline = start + (_lock_timeout() if timeout is None else timeout)
    delay = 0.02
    retried = False
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            if retried:
                longest_wait = max(longest_wait, time.monotonic() - start)
            return con
        except duckdb.IOException as exc:  # the file is locked by another process
            if not _is_lock_error(exc) or time.monotonic() >= deadline:
                if _is_lock_error(exc):
                    raise RegistryLockedError(
                        f"{path}: registry is locked by another medsae process; waited "
                        f"{_lock_timeout():.0f}s (set MEDSAE_REGISTRY_TIMEOUT to wait longer)"
                    ) from None
                raise MedsaeError(f"{path}: cannot open registry: {exc}") from None
            retried = True
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 1.5, 0.25)


def _migrate(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER, applied_at TIMESTAMPTZ)")
    row = con.execute("SELECT max(version) FROM schema_version").fetchone()
    current = row[0] or 0
    if current > SCHEMA_VERSION:
        raise MedsaeError(
            f"registry schema version {current} is newer than this medsae ({SCHEMA_VERSION}); upgrade medsae"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[version - 1]:
            con.execute(statement)
        con.execute("INSERT INTO schema_version VALUES (?, current_timestamp)", [version])
    for view in VIEWS:
        con.execute(view)


class Registry:
    """A handle on one registry file; cheap to create, holds no open connection."""

    def __init__(self, path: str | Path | None = None):
        self.path = registry_path(path)
        self._migrated = False

    def check_writable(self) -> None:
        """One line naming the path unless the registry file (and its folder, for DuckDB's WAL) is writable."""
        check_writable_file(self.path, "the registry")

    @contextlib.contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One short write transaction (committed on success, rolled back on error)."""
        if not self._migrated:
            self.check_writable()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = _connect(self.path, read_only=False)
        try:
            con.execute("BEGIN TRANSACTION")
            if not self._migrated:
                _migrate(con)
            yield con
            con.execute("COMMIT")
            self._migrated = True
        except BaseException:
            with contextlib.suppress(Exception):
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    @contextlib.contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection; the registry must exist."""
        if not self.path.exists():
            raise RegistryMissingError(f"{self.path}: no registry here yet (run `medsae exp run SPEC` first)")
        con = _connect(self.path, read_only=True)
        try:
            yield con
        finally:
            con.close()

    def ensure(self) -> None:
        """Create the file and apply migrations."""
        with self.write():
            pass

    # -- helpers -------------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Run a read-only query and return rows as dicts (empty list if no registry yet)."""
        if not self.path.exists():
            return []
        with self.read() as con:
            cur = con.execute(sql, params or [])
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row, strict=False)) for row in cur.fetchall()]

    def insert(self, table: str, rows: Sequence[Mapping[str, Any]] | pa.Table, ignore_conflicts: bool = True) -> int:
        """Insert rows by column name in one transaction; returns the number of rows offered."""
        with self.write() as con:
            return insert_rows(con, table, rows, ignore_conflicts)


def insert_rows(
    con: duckdb.DuckDBPyConnection,
    table: str,
    rows: Sequence[Mapping[str, Any]] | pa.Table,
    ignore_conflicts: bool = True,
    *,
    replace: bool = False,
) -> int:
    """Insert ``rows`` into ``table`` matching columns by name, inside the caller's transaction.

    On a primary-key conflict the existing row is kept (``ignore_conflicts``), or overwritten
    (``replace``: an upsert).
    """
    arrow = rows if isinstance(rows, pa.Table) else rows_to_arrow(rows)
    if arrow.num_rows == 0:
        return 0
    con.register("_medsae_rows", arrow)
    try:
        keyed = (ignore_conflicts or replace) and _has_primary_key(con, table)
        verb = ("INSERT OR REPLACE INTO" if replace else "INSERT OR IGNORE INTO") if keyed else "INSERT INTO"
        con.execute(f"{verb} {table} BY NAME SELECT * FROM _medsae_rows")
    finally:
        con.unregister("_medsae_rows")
    return arrow.num_rows


_KEYED_TABLES: dict[str, bool] = {}


def _has_primary_key(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    """Whether ``table`` has a primary key (INSERT OR IGNORE needs one)."""
    if table not in _KEYED_TABLES:
        row = con.execute(
            "SELECT count(*) FROM duckdb_constraints() WHERE table_name = ? AND constraint_type = 'PRIMARY KEY'",
            [table],
        ).fetchone()
        _KEYED_TABLES[table] = bool(row and row[0])
    return _KEYED_TABLES[table]


def rows_to_arrow(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Dict rows as an Arrow table with the union of every row's columns (missing -> NULL)."""
    rows = list(rows)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return pa.table({c: [row.get(c) for row in rows] for c in columns}) if rows else pa.table({})

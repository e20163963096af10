"""`medsae sql "SELECT ..."`: one read-only query over the registry, in a sandbox.

The registry is opened read-only, and before the user's statement runs the connection is locked
down (:func:`sandbox_connection`): DuckDB's ``enable_external_access`` is off (no file or network
access; only the stage folders the registry records stay readable, via ``allowed_directories``),
extensions are never installed or loaded, and the configuration is locked so a query cannot undo
any of it. On top of that, :func:`check_statement` accepts exactly one statement of a reading kind
(SELECT, EXPLAIN, informational PRAGMA...). ``--allow-files`` restores file access (``COPY ... TO``,
``EXPORT DATABASE``, ``read_csv('data.csv')``, ``ATTACH``); network access, extensions and
configuration changes stay refused.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from medsae.cli.common import FormatOption, RegistryOption, console, open_registry
from medsae.cli.output import print_table
from medsae.errors import MedsaeError

#: PRAGMAs that only report (everything else may change settings or the database).
INFO_PRAGMAS = frozenset(
    {
        "collations",
        "database_list",
        "database_size",
        "functions",
        "metadata_info",
        "platform",
        "show",
        "show_databases",
        "show_tables",
        "show_tables_expanded",
        "storage_info",
        "table_info",
        "user_agent",
        "version",
    }
)
#: Statement kinds that read (PIVOT parses as MULTI; DESCRIBE, SHOW and SUMMARIZE as SELECT).
READ_KINDS = frozenset({"SELECT", "EXPLAIN", "PRAGMA", "CALL", "MULTI"})
#: Statement kinds that read or write files: allowed with --allow-files only.
FILE_KINDS = frozenset({"COPY", "EXPORT", "ATTACH", "DETACH"})
#: The hint added to refusals the sandbox caused.
FILES_HINT = "medsae sql has no file access outside the registry's stage folders without --allow-files"


class SqlRefused(MedsaeError):
    """A statement the sandbox does not run."""


def _kind(statement: object) -> str:
    """The statement's kind (SELECT, COPY...); UNKNOWN for kinds this duckdb's Python API cannot name."""
    try:
        return str(statement.type).rsplit(".", 1)[-1]
    except ValueError:  # e.g. UPDATE EXTENSIONS: "29 is not a valid StatementType"
        return "UNKNOWN"


def check_statement(con, query: str, allow_files: bool = False) -> str:
    """The one statement in ``query`` if medsae sql may run it; else SqlRefused with one line."""
    statements = con.extract_statements(query)
    if not statements:
        raise SqlRefused('sql: empty query: give one statement, e.g. medsae sql "SELECT * FROM experiments"')
    if len(statements) > 1:
        raise SqlRefused(
            f"sql: {len(statements)} statements given; medsae sql runs one statement per call "
            "(so csv/json output stays one table): run them one by one"
        )
    statement = statements[0]
    kind = _kind(statement)
    text = statement.query.strip()
    if kind == "LOAD":
        raise SqlRefused("sql: INSTALL/LOAD refused: medsae sql never installs or loads extensions")
    if kind == "SET":
        raise SqlRefused("sql: SET/RESET/USE refused: the sandbox's configuration is locked")
    if kind == "PRAGMA":  # also IMPORT DATABASE and COPY FROM DATABASE
        match = re.match(r"(?is)\s*PRAGMA\s+(\w+)", text)
        if not match:
            raise SqlRefused(f"sql: {_short(text.split(None, 1)[0])} refused: the registry is read-only")
        if match.group(1).lower() not in INFO_PRAGMAS:
            raise SqlRefused(
                f"sql: PRAGMA {_short(match.group(1))} refused: only informational pragmas run "
                "(table_info, show_tables, database_size, version...)"
            )
    if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs its statement: check that one too
        inner = re.sub(r"(?is)^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?(\([^)]*\)\s*)?", "", text)
        if inner == text:
            raise SqlRefused("sql: EXPLAIN refused: write it as EXPLAIN [ANALYZE] SELECT ...")
        check_statement(con, inner, allow_files)
    if kind in FILE_KINDS:
        if not allow_files:
            raise SqlRefused(f"sql: {kind} refused: it reads or writes files, which needs --allow-files")
    elif kind not in READ_KINDS:
        word = _short(text.split(None, 1)[0].upper()) if kind == "UNKNOWN" else kind
        raise SqlRefused(f"sql: {word} refused: the registry is read-only (run SELECT, EXPLAIN, DESCRIBE...)")
    return statement.query


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def artifact_dirs(con, registry_path: str | Path | None = None) -> list[Path]:
    """The stage folders the registry records (``stages.artifact_dir``, ``<artifacts>/<kind>/<key>``).

    These are what the sandbox leaves readable: each stage's own folder, not the whole artifacts root
    (which a spec could set to ``/``). Relative folders are taken next to the registry file. Call
    before :func:`sandbox_connection`, which locks the connection.
    """
    import duckdb

    try:
        rows = con.execute("SELECT DISTINCT artifact_dir FROM stages WHERE artifact_dir IS NOT NULL").fetchall()
    except duckdb.Error:  # an empty or foreign database: nothing to allow
        return []
    from medsae.paths import resolve_stored

    folders = set()
    for (folder,) in rows:
        path = resolve_stored(folder, registry_path or None).resolve()
        if path != Path(path.anchor):  # never the file-system root
            folders.add(path)
    return sorted(folders)


def sandbox_connection(con, allowed_dirs: Iterable[str | Path] = (), allow_files: bool = False) -> None:
    """Lock ``con`` down: no extensions, a locked configuration, and unless ``allow_files``, no file or
    network access except reading under ``allowed_dirs`` (DuckDB's ``allowed_directories``).

    Must run before the user's statement; afterwards no SET can change any of it.
    """
    import duckdb

    if not allow_files:
        folders = sorted({str(Path(d).resolve()).rstrip("/") + "/" for d in allowed_dirs})
        if folders:
            listing = ", ".join("'" + f.replace("'", "''") + "'" for f in folders)
            try:
                con.execute(f"SET allowed_directories = [{listing}]")
            except duckdb.Error:  # duckdb < 1.2 has no allowed_directories: everything stays refused
                pass
        con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def _register_views(con, registry_path: Path) -> None:
    """The TEMP views over the stages' Parquet files (``codes``...), read inside the sandbox's folders."""
    from medsae.registry.codes_view import register_code_views

    register_code_views(con, registry_path)


def _error_lines(exc: Exception) -> list[str]:
    """DuckDB's message: its first line, its 'Did you mean' hint and its LINE/caret pair; nothing else."""
    lines = [line.rstrip() for line in str(exc).strip().splitlines()]
    kept = [lines[0]] if lines else ["unknown error"]
    for i, line in enumerate(lines[1:], start=1):
        if line.startswith("Did you mean"):
            kept.append(line)
        elif line.startswith("LINE ") and i + 1 < len(lines) and lines[i + 1].strip().startswith("^"):
            kept.extend([line[:200], lines[i + 1][:200]])
    return kept


def _fail(exc: Exception) -> None:
    import duckdb

    lines = _error_lines(exc)
    if isinstance(exc, duckdb.PermissionException):  # the sandbox said no: one line, with the way out
        raise SqlRefused(f"sql: {lines[0]} ({FILES_HINT})") from None
    if len(lines) == 1:
        raise MedsaeError(f"sql: {lines[0]}") from None
    print(f"error: sql: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line}", file=sys.stderr)
    raise typer.Exit(1)


def sql_command(
    query: str = typer.Argument(
        ..., help="One SQL statement (the registry is opened read-only); - reads it from stdin."
    ),
    format: FormatOption = "table",
    limit: int = typer.Option(200, min=0, help="Rows shown in table format (csv/json print all)."),
    allow_files: bool = typer.Option(
        False,
        "--allow-files",
        help="Let the statement read and write files (COPY ... TO, EXPORT DATABASE, read_csv, ATTACH). "
        "Without it only the registry and its artifacts folders are readable.",
    ),
    registry: RegistryOption = None,
) -> None:
    """Run one SQL statement against the registry, read-only and sandboxed (no files, network or extensions
    unless --allow-files); tables: experiments, stages, metrics, latents, explanations..."""
    import duckdb

    if query == "-":  # e.g. medsae exp compare A B --show-sql | medsae sql -
        query = sys.stdin.read()
    reg = open_registry(registry)
    with reg.read() as con:
        try:
            folders = [] if allow_files else artifact_dirs(con, reg.path)
            sandbox_connection(con, folders, allow_files=allow_files)
            _register_views(con, reg.path)
            check_statement(con, query, allow_files=allow_files)
            cur = con.execute(query)
            if cur.description is None:
                return
            columns = [d[0] for d in cur.description]
            if format == "table":
                rows = cur.fetchmany(limit) if limit else []
                more = 0
                while chunk := cur.fetchmany(10_000):
                    more += len(chunk)
            else:
                rows = cur.fetchall()
        except duckdb.Error as exc:
            _fail(exc)
            return
    if format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    elif format == "json":
        print(json.dumps([dict(zip(columns, r, strict=False)) for r in rows], default=str, indent=1))
    else:
        table = Table()
        for c in columns:  # cells wrap and are never cut (medsae.cli.output)
            table.add_column(Text(c), overflow="fold", no_wrap=False)
        for r in rows:  # Text: names and values are never read as rich markup
            table.add_row(*(Text("NULL" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)) for v in r))
        print_table(table)
        if more:
            console().print(f"[dim]{more} more rows (use --limit or --format csv)[/]")

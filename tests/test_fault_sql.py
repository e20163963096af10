"""Fault suite, SQL part: `medsae sql` has no file, network or extension access unless asked.

Every case runs the real CLI entry point (in-process for speed, plus a few subprocesses) against a
real registry file on disk; a refusal must be one `error: sql: ...` line, a non-zero exit, no
traceback and no file created.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import duckdb
import pytest

from medsae.cli.main import main
from medsae.cli.sql import artifact_dirs, sandbox_connection
from medsae.registry import Registry

METRICS = [("k_encode", "val", "fvu", 0.25, 10), ("k_encode", "test", "fvu", 0.5, 12)]


def run_cli(*args: str) -> tuple[int, str, str]:
    """`medsae ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["medsae", *args]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A registry with two metrics and one stage folder holding a Parquet file; another one outside.

    Shared by the module's tests: each checks that it leaves the folder as it found it, or writes
    only names no other test uses.
    """
    tmp_path = tmp_path_factory.mktemp("sql")
    stage = tmp_path / "artifacts" / "encode" / "k_encode"
    outside = tmp_path / "outside"
    stage.mkdir(parents=True)
    outside.mkdir()
    with duckdb.connect() as con:
        con.execute(f"COPY (SELECT 7 AS v) TO '{stage / 'inside.parquet'}'")
        con.execute(f"COPY (SELECT 9 AS v) TO '{outside / 'outside.parquet'}'")
        # the encode stage's activations, which the `codes` view reads (slice_id, latent, value)
        con.execute(
            "COPY (SELECT * FROM (VALUES (1::BIGINT, 3, 0.5::FLOAT), (2, 3, 1.5), (2, 4, 2.0)) "
            f"t(slice_id, latent, value)) TO '{stage / 'codes.parquet'}'"
        )
    reg = Registry(tmp_path / "registry.duckdb")
    reg.insert(
        "stages",
        [
            {
                "stage_key": "k_encode",
                "kind": "encode",
                "code_version": "1",
                "params_json": "{}",
                "status": "done",
                "artifact_dir": str(stage),
            }
        ],
    )
    reg.insert("experiments", [{"experiment_id": "e1", "name": "demo", "spec_json": "{}", "spec_hash": "h"}])
    reg.insert("experiment_stages", [{"experiment_id": "e1", "kind": "encode", "stage_key": "k_encode"}])
    reg.insert("metrics", [dict(zip(("stage_key", "split", "name", "value", "n"), m, strict=True)) for m in METRICS])
    return {"tmp": tmp_path, "registry": reg.path, "stage": stage, "outside": outside}


def sql(world: dict[str, Path], query: str, *flags: str) -> tuple[int, str, str]:
    return run_cli("sql", query, "--registry", str(world["registry"]), *flags)


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


REFUSED = [
    "COPY metrics TO '{tmp}/x.csv'",
    "COPY (SELECT 1) TO '{stage}/inside_copy.csv'",
    "EXPORT DATABASE '{tmp}/export'",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_parquet('{outside}/outside.parquet')",
    "SELECT * FROM read_parquet('{stage}/../../../outside/outside.parquet')",
    "INSTALL httpfs",
    "FORCE INSTALL httpfs",
    "LOAD httpfs",
    "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')",
    "ATTACH '{tmp}/other.duckdb'",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "RESET enable_external_access",
    "PRAGMA threads = 1",
    "PRAGMA enable_profiling",
    "PRAGMA profiling_output = '{tmp}/profile.json'",
    "IMPORT DATABASE '{tmp}'",
    "EXPLAIN ANALYZE COPY metrics TO '{stage}/explained.csv'",
    "CREATE TEMP TABLE t AS SELECT 1",
    "INSERT INTO metrics VALUES ('x', 'val', 'fvu', 1.0, 1, NULL, NULL, NULL)",
    "",
    "  ; -- only a comment",
    "SELECT 1; SELECT 2",
]


@pytest.mark.parametrize("template", REFUSED)
def test_refused_with_one_line_and_nothing_written(world, template):
    query = template.format(**{k: str(v) for k, v in world.items()})
    before = listing(world["tmp"])
    code, out, err = sql(world, query)
    lines = err.strip().splitlines()
    assert code != 0 and "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("error: sql: "), err
    assert listing(world["tmp"]) == before


def test_refusal_messages_say_why(world):
    assert "empty query" in sql(world, "   ")[2]
    assert "2 statements" in sql(world, "SELECT 1; SELECT 2")[2]
    assert "--allow-files" in sql(world, f"COPY metrics TO '{world['tmp']}/x.csv'")[2]
    assert "--allow-files" in sql(world, "SELECT * FROM read_csv('/etc/passwd')")[2]
    assert "INSTALL/LOAD refused" in sql(world, "INSTALL httpfs")[2]
    assert "configuration is locked" in sql(world, "SET enable_external_access = true")[2]


def test_reading_statements_run_and_return_the_registry_rows(world):
    code, out, err = sql(world, "SELECT split, value, n FROM metrics ORDER BY split", "--format", "csv")
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["split", "value", "n"]
    assert sorted((r[0], float(r[1]), int(r[2])) for r in rows[1:]) == sorted((m[1], m[3], m[4]) for m in METRICS)
    for query in (
        "DESCRIBE metrics",
        "PRAGMA table_info('metrics')",
        "EXPLAIN SELECT count(*) FROM metrics",
        "PIVOT metrics ON split USING sum(value)",
        "SELECT '[/]' AS \"[bold]\"",  # rich markup in values must print as text
    ):
        code, out, err = sql(world, query)
        assert code == 0 and "Traceback" not in out + err, (query, err)
    code, out, _ = sql(world, "SELECT current_setting('enable_external_access') AS x", "--format", "csv")
    assert [w.lower() for w in out.split()] == ["x", "false"]


def test_stage_folders_stay_readable(world):
    query = f"SELECT v FROM read_parquet('{world['stage'] / 'inside.parquet'}')"
    code, out, err = sql(world, query, "--format", "csv")
    assert code == 0 and out.split() == ["v", "7"], err


def test_codes_view_reads_the_stage_folder_inside_the_sandbox(world):
    code, out, err = sql(world, "SELECT count(*) AS n, sum(value) AS s FROM codes WHERE latent = 3", "-f", "csv")
    assert code == 0, err
    assert out.split() == ["n,s", "2,2.0"]  # the two latent-3 rows written above: 0.5 + 1.5


def test_duckdb_hint_and_caret_are_kept(world):
    code, out, err = sql(world, "SELECT * FROM metricz")
    lines = err.rstrip().splitlines()
    assert code == 1 and "Traceback" not in out + err
    assert lines[0].startswith("error: sql: Catalog Error: Table with name metricz does not exist")
    assert any('Did you mean "metrics"' in line for line in lines[1:])
    caret = next(i for i, line in enumerate(lines) if "LINE 1:" in line)
    assert lines[caret + 1].strip().startswith("^") and len(lines) <= 4
    # the caret sits under the misspelt table name
    assert lines[caret + 1].index("^") == lines[caret].index("metricz")


def test_allow_files_lets_copy_and_read_csv_work(world):
    target = world["tmp"] / "export" / "metrics.csv"
    target.parent.mkdir()
    code, _, err = sql(world, f"COPY (SELECT split, value FROM metrics ORDER BY split) TO '{target}'", "--allow-files")
    assert code == 0, err
    with target.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["split"], float(r["value"])) for r in rows] == sorted((m[1], m[3]) for m in METRICS)
    code, out, err = sql(world, f"SELECT count(*) AS n FROM read_csv('{target}')", "--allow-files", "-f", "csv")
    assert code == 0 and out.split() == ["n", str(len(METRICS))], err
    # the flag is about files: extensions and configuration stay refused, and http needs an extension
    for query in ("INSTALL httpfs", "SET threads = 1", "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')"):
        code, out, err = sql(world, query, "--allow-files")
        assert code != 0 and "Traceback" not in out + err and err.startswith("error: sql: "), query


def test_sandbox_allows_only_the_given_folders(world):
    """The helper the registry views use: reads under allowed folders, nothing else, settings locked."""
    con = duckdb.connect(str(world["registry"]), read_only=True)
    try:
        folders = artifact_dirs(con, world["registry"])
        assert folders == [world["stage"].resolve()]
        sandbox_connection(con, folders)
        assert con.execute(f"SELECT v FROM read_parquet('{world['stage'] / 'inside.parquet'}')").fetchall() == [(7,)]
        sibling = world["stage"].parent / (world["stage"].name + "X")
        sibling.mkdir()
        (sibling / "s.csv").write_text("a\n1\n")
        for path in (world["outside"] / "outside.parquet", sibling / "s.csv", Path("/etc/passwd")):
            with pytest.raises(duckdb.PermissionException):
                con.execute(f"SELECT * FROM read_csv('{path}')").fetchall()
        for statement in (
            "SET enable_external_access = true",
            "SET lock_configuration = false",
            f"SET allowed_directories = ['{world['outside']}/']",
        ):
            with pytest.raises(duckdb.Error, match="locked"):
                con.execute(statement)
    finally:
        con.close()


def test_artifact_dirs_reads_relative_folders_next_to_the_registry_and_never_the_root(tmp_path):
    reg = Registry(tmp_path / "reg" / "registry.duckdb")
    base = {"kind": "encode", "code_version": "1", "params_json": "{}", "status": "done"}
    reg.insert(
        "stages",
        [
            {**base, "stage_key": "a", "artifact_dir": "art/encode/a"},
            {**base, "stage_key": "b", "artifact_dir": "/"},
            {**base, "stage_key": "c", "artifact_dir": None},
        ],
    )
    with reg.read() as con:
        assert artifact_dirs(con, reg.path) == [(tmp_path / "reg" / "art" / "encode" / "a").resolve()]


def test_headline_cases_through_the_installed_command(world):
    """The issue's two commands, run as a user would (a subprocess): one line each; the flag allows the export."""
    env = dict(os.environ, MEDSAE_REGISTRY=str(world["registry"]))
    target = world["tmp"] / "headline.csv"

    def medsae(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "medsae.cli.main", *args]
        return subprocess.run(cmd, cwd=world["tmp"], env=env, capture_output=True, text=True, timeout=120)

    for query in ("SELECT * FROM read_csv('/etc/passwd')", f"COPY metrics TO '{target}'"):
        proc = medsae("sql", query)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr and not target.exists()
    proc = medsae("sql", "--allow-files", f"COPY metrics TO '{target}'")
    assert proc.returncode == 0, proc.stderr
    assert len(target.read_text().strip().splitlines()) == len(METRICS) + 1

"""The registry: migrations, inserts, read-only queries, and a second writer's bounded wait."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from medsae.registry import Registry, RegistryLockedError
from medsae.registry.schema import SCHEMA_VERSION


def test_migrations_create_every_table_once(tmp_path):
    reg = Registry(tmp_path / "r.duckdb")
    reg.ensure()
    reg.ensure()  # idempotent
    versions = reg.query("SELECT version FROM schema_version ORDER BY version")
    assert [r["version"] for r in versions] == list(range(1, SCHEMA_VERSION + 1))
    tables = {r["table_name"] for r in reg.query("SELECT table_name FROM information_schema.tables")}
    for name in (
        "experiments",
        "stages",
        "metrics",
        "slices",
        "slice_structures",
        "latents",
        "explanations",
        "explanation_scores",
        "llm_calls",
        "example_sets",
        "prompts",
        "artifacts",
    ):
        assert name in tables


def test_insert_by_name_ignores_duplicate_keys(tmp_path):
    reg = Registry(tmp_path / "r.duckdb")
    row = {"template_hash": "abc", "name": "t", "text": "hello"}
    reg.insert("prompts", [row])
    reg.insert("prompts", [row, {"template_hash": "def", "name": "u", "text": "x"}])
    rows = reg.query("SELECT template_hash FROM prompts ORDER BY 1")
    assert [r["template_hash"] for r in rows] == ["abc", "def"]


def test_failed_transaction_writes_nothing(tmp_path):
    reg = Registry(tmp_path / "r.duckdb")
    reg.ensure()
    with pytest.raises(RuntimeError), reg.write() as con:
        con.execute("INSERT INTO prompts VALUES ('h', 'n', 't')")
        raise RuntimeError("boom")
    assert reg.query("SELECT count(*) AS n FROM prompts")[0]["n"] == 0


def test_second_writer_waits_then_fails_clearly(tmp_path, monkeypatch):
    path = tmp_path / "r.duckdb"
    Registry(path).ensure()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import duckdb, sys, time
            con = duckdb.connect({str(path)!r})
            print("locked", flush=True)
            time.sleep(20)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("MEDSAE_REGISTRY_TIMEOUT", "1.5")
        t0 = time.perf_counter()
        with pytest.raises(RegistryLockedError) as err:
            Registry(path).insert("prompts", [{"template_hash": "x", "name": "n", "text": "t"}])
        waited = time.perf_counter() - t0
        assert 1.0 <= waited < 10
        message = str(err.value)
        assert "\n" not in message and str(path) in message and "locked" in message
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone, the write goes through
    Registry(path).insert("prompts", [{"template_hash": "x", "name": "n", "text": "t"}])
    assert Registry(path).query("SELECT count(*) AS n FROM prompts")[0]["n"] == 1


def test_insert_into_tables_without_keys_appends(tmp_path):
    reg = Registry(tmp_path / "r.duckdb")
    row = {"stage_key": "k", "split": "val", "name": "fvu", "value": 0.5}
    reg.insert("metrics", [row])
    reg.insert("metrics", [row])
    assert reg.query("SELECT count(*) AS n FROM metrics")[0]["n"] == 2


def test_insert_keeps_columns_missing_from_the_first_row(tmp_path):
    reg = Registry(tmp_path / "r.duckdb")
    reg.insert(
        "metrics",
        [
            {"stage_key": "k", "name": "a", "value": 1.0},
            {"stage_key": "k", "name": "b", "value": 2.0, "target": "liver", "n_features": 5},
        ],
    )
    rows = reg.query("SELECT name, target, n_features FROM metrics ORDER BY name")
    assert rows == [
        {"name": "a", "target": None, "n_features": None},
        {"name": "b", "target": "liver", "n_features": 5},
    ]


def test_a_reader_waits_for_a_writers_transaction_then_sees_its_rows(tmp_path):
    """DuckDB lets one process write OR several read: a reader retries until the writer closes."""
    from medsae.registry import db

    path = tmp_path / "r.duckdb"
    Registry(path).ensure()
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import duckdb, time
            con = duckdb.connect({str(path)!r})
            con.execute("INSERT INTO prompts (template_hash, name, text) VALUES ('h', 'n', 't')")
            print("writing", flush=True)
            time.sleep(1.5)
            con.close()
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        db.longest_wait = 0.0
        rows = Registry(path).query("SELECT name FROM prompts")
        assert rows == [{"name": "n"}]
        assert db.longest_wait > 0  # it could not open the file at once: it waited, then read
    finally:
        writer.kill()
        writer.wait()

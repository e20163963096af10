"""`medsae exp rm`, `medsae gc` and `medsae exp tag` on a real tiny project (see test_portability).

The project is the session's finished tiny run, copied; a second experiment is run in it with
`--set sae.k=2` (sharing the slices and embed stages). Expected rows, folders and byte counts are
computed here from the registry file and the file system, not taken from the code under test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from test_portability import SPEC, cli, copy_project, plan_statuses, tiny_project

from medsae.errors import MedsaeError

STAGE_TABLES = ("metrics", "artifacts", "latents", "example_sets")


def rows(registry: Path, sql: str, params=None) -> list[tuple]:
    con = duckdb.connect(str(registry), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def gc_items(output: str, project: Path) -> dict[Path, str]:
    """path -> what, from the dry-run listing ('  12.3 kB  orphaned stage folder   artifacts/...')."""
    items = {}
    for line in output.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[1] in ("B", "kB", "MB", "GB"):
            what, _, rel = parts[2].rpartition(" ")
            items[(project / rel.strip()).resolve()] = what.strip()
    return items


@pytest.fixture
def project(tmp_path_factory, tmp_path, monkeypatch) -> Path:
    template = tiny_project(tmp_path_factory, monkeypatch)
    monkeypatch.chdir(tmp_path)
    return copy_project(template, tmp_path / "project")


def test_rm_keeps_shared_stages_and_gc_frees_the_rest(project):
    registry = project / "registry.duckdb"
    reg = ["--registry", str(registry)]
    first_id = rows(registry, "SELECT experiment_id FROM experiments")[0][0]
    before = {t: rows(registry, f"SELECT count(*) FROM {t}")[0][0] for t in (*STAGE_TABLES, "slices", "stages")}
    assert cli("gc", *reg).output.strip().endswith("nothing to free")

    out = cli("exp", "run", str(project / SPEC), "--set", "sae.k=2", *reg).output
    assert "5 stage(s) run, 2 already done" in out  # slices and embed are shared
    second_id = next(r[0] for r in rows(registry, "SELECT experiment_id FROM experiments") if r[0] != first_id)
    assert '"k":2' in rows(registry, "SELECT spec_json FROM experiments WHERE experiment_id = ?", [second_id])[0][0]
    own = dict(
        rows(
            registry,
            """SELECT s.stage_key, s.artifact_dir FROM experiment_stages es JOIN stages s USING (stage_key)
               WHERE es.experiment_id = ? AND es.stage_key NOT IN
                 (SELECT stage_key FROM experiment_stages WHERE experiment_id = ?)""",
            [second_id, first_id],
        )
    )
    assert len(own) == 5
    own_dirs = {(project / d).resolve() for d in own.values()}
    sae_key = rows(
        registry, "SELECT stage_key FROM experiment_stages WHERE experiment_id = ? AND kind = 'train'", [second_id]
    )[0][0]
    assert rows(registry, "SELECT count(*) FROM explanations WHERE sae_key = ?", [sae_key])[0][0] > 0

    # answering no removes nothing
    declined = cli("exp", "rm", f"tiny@{second_id[:10]}", *reg, ok=False, input="n\n")
    assert declined.exit_code == 1
    assert rows(registry, "SELECT count(*) FROM experiments")[0][0] == 2

    out = cli("exp", "rm", f"tiny@{second_id[:10]}", "--yes", *reg).output
    assert "stages removed: 5" in out and "stages kept (other experiments use them): 2" in out
    assert [r[0] for r in rows(registry, "SELECT experiment_id FROM experiments")] == [first_id]
    for table, count in before.items():  # the first experiment's rows, exactly as before
        assert rows(registry, f"SELECT count(*) FROM {table}")[0][0] == count, table
    assert rows(registry, "SELECT count(*) FROM experiment_stages WHERE experiment_id = ?", [second_id]) == [(0,)]
    assert rows(registry, "SELECT count(*) FROM explanations WHERE sae_key = ?", [sae_key]) == [(0,)]
    assert rows(
        registry,
        "SELECT count(*) FROM explanation_scores WHERE explanation_id NOT IN (SELECT explanation_id FROM explanations)",
    ) == [(0,)]
    assert all(d.is_dir() for d in own_dirs)  # rm leaves folders to gc

    # leftovers of killed runs and LLM cache entries nobody references
    train = project / "artifacts" / "train"
    tmp_left = train / ".tmp" / ("a" * 64)
    work_left = train / ".work" / ("b" * 64)
    for folder in (tmp_left, work_left):
        folder.mkdir(parents=True)
        (folder / "checkpoint.bin").write_bytes(os.urandom(3000))
    busy = train / ".work" / ("c" * 64)
    busy.mkdir()
    (busy / "state.bin").write_bytes(b"x" * 100)
    cache = project / "artifacts" / "llm_cache"
    referenced = {r[0] for r in rows(registry, "SELECT request_hash FROM llm_calls")}
    entries = list(cache.rglob("*.json"))
    assert entries and all(p.stem in referenced for p in entries)  # a real run's cache is all referenced
    old, fresh = "d" * 64, "e" * 64
    for name in (old, fresh):
        target = cache / name[:2] / f"{name}.json"
        target.parent.mkdir(exist_ok=True)
        target.write_text(entries[0].read_text())
    hour_ago = time.time() - 2 * 3600
    os.utime(cache / old[:2] / f"{old}.json", (hour_ago, hour_ago))

    lock = train / ".locks" / f"{'c' * 64}.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import filelock,sys,time; l=filelock.FileLock({str(lock)!r}); l.acquire(); "
         "print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        dry = cli("gc", *reg).output
        items = gc_items(dry, project)
        expected = {d: "orphaned stage folder" for d in own_dirs}
        expected[tmp_left.resolve()] = "leftover .tmp"
        expected[work_left.resolve()] = "leftover .work"
        expected[(cache / old[:2] / f"{old}.json").resolve()] = "stale LLM cache entry"
        assert items == expected, dry
        assert f"{busy}: a running medsae process holds its stage lock" in dry.replace("\n", "")
        total = sum(folder_bytes(p) for p in expected)
        assert f"would free {human(total)} in {len(expected)} item(s)" in dry
        assert all(p.exists() for p in expected)  # a dry run deletes nothing

        assert (cache / fresh[:2] / f"{fresh}.json").resolve() in gc_items(
            cli("gc", "--keep-recent", "0", *reg).output, project
        )

        done = cli("gc", "--delete", *reg).output
        assert f"freed {human(total)} in {len(expected)} item(s)" in done
        assert not any(p.exists() for p in expected)
        assert busy.is_dir() and (cache / fresh[:2] / f"{fresh}.json").is_file()
    finally:
        holder.kill()
        holder.wait()
    assert all((cache / e.relative_to(cache)).is_file() for e in entries)  # referenced entries stay
    assert plan_statuses(project) == ["done"] * 7  # the first experiment lost nothing

    # removing the last experiment orphans every stage folder it had
    cli("exp", "rm", "tiny", "--yes", *reg)
    assert rows(registry, "SELECT count(*) FROM stages") == [(0,)] and rows(
        registry, "SELECT count(*) FROM slices"
    ) == [(0,)]
    listed = gc_items(cli("gc", *reg).output, project)
    stage_dirs = {
        p.resolve()
        for kind in (project / "artifacts").iterdir()
        if kind.is_dir()
        for p in kind.iterdir()
        if len(p.name) == 64
    }
    assert {p for p, what in listed.items() if what == "orphaned stage folder"} == stage_dirs
    assert len(stage_dirs) == 7


def human(n: int) -> str:
    """Decimal units, as gc prints them (computed here from the byte count)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def test_rm_and_gc_errors_are_one_line(project, tmp_path):
    registry = project / "registry.duckdb"
    missing = cli("exp", "rm", "nope", "--yes", "--registry", str(registry), ok=False)
    assert isinstance(missing.exception, MedsaeError) and "'nope'" in str(missing.exception)
    assert rows(registry, "SELECT count(*) FROM experiments") == [(1,)]
    nothing = cli("gc", "--registry", str(tmp_path / "absent.duckdb"), ok=False)
    assert isinstance(nothing.exception, MedsaeError) and "absent.duckdb" in str(nothing.exception)
    assert len(str(nothing.exception).splitlines()) == 1
    assert not (tmp_path / "absent.duckdb").exists()


def test_tags_and_note_show_in_list_and_show(project):
    reg = ["--registry", str(project / "registry.duckdb")]
    out = cli("exp", "tag", "tiny", "base", "toy", "--note", "first tiny run", *reg).output
    assert "tags base, toy; note: first tiny run" in out
    out = cli("exp", "tag", "tiny", "--remove", "toy", "cpu", *reg).output
    assert "tags base, cpu;" in out
    tags = rows(project / "registry.duckdb", "SELECT tag FROM experiment_tags ORDER BY tag")
    assert tags == [("base",), ("cpu",)]
    listing = cli("exp", "list", "--format", "csv", *reg, ok=False)
    if listing.exit_code != 0:  # an `exp list` without --format: a table, cells may wrap between words
        listing = cli("exp", "list", *reg)
    words = set(re.findall(r"[a-z]+", listing.output))
    assert {"base", "cpu"} <= words and "toy" not in words
    show = cli("exp", "show", "tiny", *reg).output
    assert "tags: base, cpu" in show and "note: first tiny run" in show
    cli("exp", "tag", "tiny", "--note", "", *reg)
    assert rows(project / "registry.duckdb", "SELECT count(*) FROM experiment_notes") == [(0,)]
    assert "note:" not in cli("exp", "show", "tiny", *reg).output
    empty = cli("exp", "tag", "tiny", *reg, ok=False)
    assert empty.exit_code != 0 and "nothing to do" in str(empty.exception)

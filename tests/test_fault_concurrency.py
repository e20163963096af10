"""Fault suite, concurrency: two `exp run` of one spec at once, readers during a run, lock timeouts.

Everything runs the real `medsae` command in subprocesses against a real DuckDB registry and real
artifacts; nothing of medsae is mocked. The spec is the e2e tests' tiny spec made smaller still
(fewer, smaller scans, few epochs, no plots), so three pipelines fit in a CI minute.
"""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import yaml
from test_e2e import tiny_spec

from medsae.registry import Registry

#: metrics that measure time or speed: they differ between any two runs
TIMING_WORDS = ("seconds", "_per_s")
#: registry tables whose row counts must match between the concurrent pair and a single run
TABLES = (
    "experiments", "stages", "experiment_stages", "artifacts", "metrics", "slices", "slice_structures",
    "ingest_skips", "latents", "example_sets", "explanations", "explanation_scores", "llm_calls",
)  # fmt: skip


def micro_spec(tmp: Path, artifacts: str, data_root: Path) -> dict:
    spec = tiny_spec(tmp, artifacts)
    spec["data"].update(
        root=str(data_root), phantom={"subjects": 6, "seed": 3, "shape": [24, 24, 32]}, size=32, stride=2
    )
    spec["embed"].update(input_size=32, pretrained=False)
    spec["sae"].update(d_sae=64, k=4, epochs=8)
    spec["eval"].update(recovery_ns=[1, 5], retrieval_refs=20, mono_null_draws=10, plots=False)
    spec["interpret"].update(
        max_latents=6, detect=False, ranking=False, bootstrap=20, permutations=20, simulate_random=4, shuffled_min=2
    )
    return spec


def _env(**extra: str) -> dict[str, str]:
    # one compute thread per process: three pipelines share the CI machine's two cores
    return dict(os.environ, MEDSAE_QUIET="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)


def start(*args: str, cwd: Path, umask: int = -1, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medsae.cli.main", *args],
        cwd=cwd,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        umask=umask,
    )


def run(*args: str, cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medsae.cli.main", *args],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def query(registry: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(registry), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def metric_values(registry: Path) -> dict[tuple, float | None]:
    """(stage kind, split, name, target, n_features) -> value, timings left out; duplicates fail."""
    rows = query(
        registry,
        """SELECT es.kind, m.split, m.name, coalesce(m.target, ''), coalesce(m.n_features, -1), m.value
           FROM experiment_stages es JOIN metrics m ON m.stage_key = es.stage_key""",
    )
    out: dict[tuple, float | None] = {}
    for *key, value in rows:
        if any(word in key[2] for word in TIMING_WORDS):
            continue
        assert tuple(key) not in out, f"metric recorded twice: {key}"
        out[tuple(key)] = value
    return out


def counts(registry: Path) -> dict[str, int]:
    return {t: query(registry, f"SELECT count(*) FROM {t}")[0][0] for t in TABLES}


def wait_for_experiment(registry: Path, writers: list[subprocess.Popen]) -> None:
    """Until a writer has registered the experiment (readers need it to exist)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert any(p.poll() is None for p in writers), "the runs ended before registering the experiment"
        if registry.exists() and Registry(registry).query("SELECT count(*) AS n FROM experiments")[0]["n"]:
            return
        time.sleep(0.2)
    pytest.fail("no experiment registered within 300 s")


def reader_loop(registry: Path, cwd: Path, writers: list[subprocess.Popen]) -> list[tuple[str, float, int, str]]:
    """`medsae sql`, `exp show` and `report` in turn until the writers end: (command, seconds, rc, output).

    The commands run in this process (the real typer app, as the console script runs it), so a
    call's time is its registry waits and its work, without the interpreter start-up of each call.
    """
    from typer.testing import CliRunner

    from medsae.cli.main import app

    commands = [
        ["sql", "SELECT kind, status FROM stages", "--format", "csv"],
        ["exp", "show", "tiny"],
        ["report", "tiny", "-o", str(cwd / "report.html"), "--latents", "4"],
    ]
    runner = CliRunner()
    calls = []
    i = 0
    while any(p.poll() is None for p in writers):
        args = commands[i % len(commands)]
        t0 = time.perf_counter()
        result = runner.invoke(app, [*args, "--registry", str(registry)])
        calls.append((" ".join(args[:2]), time.perf_counter() - t0, result.exit_code, repr(result.exception)))
        i += 1
        time.sleep(2.0)  # leave the CPU to the writers between calls
    return calls


def test_two_runs_at_once_build_each_stage_once_and_equal_a_single_run(tmp_path):
    data_root = tmp_path / "phantom"  # shared by all three runs: generated once, under its lock
    pair, single = tmp_path / "pair.yaml", tmp_path / "single.yaml"
    pair.write_text(yaml.safe_dump(micro_spec(tmp_path, "artifacts", data_root)))
    single.write_text(yaml.safe_dump(micro_spec(tmp_path, "single_artifacts", data_root)))
    registry, single_registry = tmp_path / "pair.duckdb", tmp_path / "single.duckdb"

    writers = [start("exp", "run", str(pair), "--registry", str(registry), cwd=tmp_path, umask=0o027) for _ in range(2)]
    reference = start("exp", "run", str(single), "--registry", str(single_registry), cwd=tmp_path, umask=0o022)
    try:
        wait_for_experiment(registry, writers)
        calls = reader_loop(registry, tmp_path, writers)
        outputs = [p.communicate(timeout=600) for p in [*writers, reference]]
    finally:
        for p in [*writers, reference]:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip([*writers, reference], outputs, strict=True):
        assert p.returncode == 0, f"{out}\n{err}"

    # each stage was built by exactly one of the two processes; the other waited and reused it
    lines = [line.split() for out, _ in outputs[:2] for line in out.splitlines()]
    ran = sorted(w[1] for w in lines if w and w[0] == "ran")
    reused = sorted(w[1] for w in lines if w and w[0] == "done")
    stages = ["embed", "encode", "evaluate", "interpret", "slices", "summarize", "train"]
    assert ran == stages and reused == stages

    # the registry equals a single run's: same rows, same keys, same metric values
    assert counts(registry) == counts(single_registry)
    keys = "SELECT kind, stage_key FROM experiment_stages ORDER BY kind"
    assert query(registry, keys) == query(single_registry, keys)
    assert query(registry, "SELECT count(*) FROM stages WHERE status = 'done'")[0][0] == 7
    a, b = metric_values(registry), metric_values(single_registry)
    assert a.keys() == b.keys() and len(a) > 50
    for key, value in a.items():
        if value is None or b[key] is None:
            assert value is None and b[key] is None, key
        else:
            assert math.isclose(value, b[key], rel_tol=1e-6, abs_tol=1e-9), (key, value, b[key])

    # nothing half-written is left, and files follow the umask of the run that wrote them
    assert not list(data_root.glob(".phantom-tmp*"))
    for kind in stages:
        assert not any((tmp_path / "artifacts" / kind / ".tmp").glob("*")), kind
    for root, umask in ((tmp_path / "artifacts", 0o027), (tmp_path / "single_artifacts", 0o022)):
        (weights,) = root.glob("train/*/sae.safetensors")
        assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask, weights
        for path in root.glob("*/[!.]*/**/*"):
            if path.is_file():
                assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path

    # every reader call during the run succeeded (after bounded waits for the writers)
    assert len(calls) >= 3, calls
    failed = [(c, rc, err) for c, _, rc, err in calls if rc != 0]
    assert not failed, failed
    slowest = max(calls, key=lambda c: c[1])
    print(f"\n{len(calls)} reader calls during the run, all exit 0; slowest {slowest[0]}: {slowest[1]:.1f}s")


def test_a_held_stage_lock_times_out_with_one_line(tmp_path):
    import filelock

    from medsae.plan import plan_experiment
    from medsae.spec import parse_specs

    spec = micro_spec(tmp_path, "artifacts", tmp_path / "phantom")
    spec["data"]["phantom"] = {"subjects": 3, "seed": 0, "shape": [16, 16, 20]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    node = plan_experiment(parse_specs(spec)[0]).nodes["slices"]  # writes the phantom, as the run would
    registry = tmp_path / "r.duckdb"
    with filelock.FileLock(str(node.lock_path)):  # "another process" building the slices stage
        proc = run("exp", "run", str(path), "--registry", str(registry), cwd=tmp_path, MEDSAE_LOCK_TIMEOUT="1")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(node.lock_path) in lines[0] and "MEDSAE_LOCK_TIMEOUT" in lines[0]
    print(f"\n{lines[0]}")
    assert "wait  slices" in proc.stdout
    assert query(registry, "SELECT count(*) FROM stages")[0][0] == 0
    assert not node.final_dir.exists() and not node.tmp_dir.exists()


def test_two_phantom_writers_at_once_write_one_complete_dataset(tmp_path):
    from medsae.data.totalsegmentator import dataset_manifest, discover, present_modalities

    args = ("data", "phantom", "--subjects", "5", "--seed", "2", "--shape", "16,16,20")
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    procs = [start(*args[:2], str(shared), *args[2:], cwd=tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert run(*args[:2], str(alone), *args[2:], cwd=tmp_path).returncode == 0
    assert dataset_manifest(shared) == dataset_manifest(alone)
    assert len(discover(shared, present_modalities(shared))) == 5
    assert not list(shared.glob(".phantom-tmp*"))

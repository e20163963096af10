"""Nothing finished is lost: a killed ``explain run`` and a crashed ``interpret`` stage resume.

* ``medsae explain run`` in a subprocess is killed with SIGKILL once the registry holds some
  finished latents; the same command is run again and ends with exactly the rows of an
  uninterrupted run, without asking the server again for what the killed run had finished.
* The ``interpret`` stage crashes halfway (the provider starts rejecting the key); its finished
  latents are in the stage's work folder, and the rerun asks only for the others, with an empty
  LLM cache, and returns the rows of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from interp_fixtures import PUZZLE_PARAMS, puzzle_experiment
from llm_server import (  # noqa: F401  (llm_server_fixture provides the llm_server fixture)
    baseline_handler,
    error_json,
    llm_server_fixture,
    task_of,
)
from typer.testing import CliRunner

from medsae.errors import MedsaeError
from medsae.interp.config import InterpretSpec
from medsae.registry import Registry
from medsae.stage import StageContext

PARAMS = InterpretSpec.model_validate(PUZZLE_PARAMS).model_dump(mode="json")

EXPLANATION_COLUMNS = "explanation_id, latent, kind, status, text, n_examples"
SCORE_COLUMNS = "score_id, explanation_id, method, value, n, n_missing, n_repaired, degenerate"


def _rows(registry: Registry) -> tuple[set, set]:
    expl = registry.query(f"SELECT {EXPLANATION_COLUMNS} FROM explanations")
    scores = registry.query(f"SELECT {SCORE_COLUMNS} FROM explanation_scores")
    return {tuple(r.values()) for r in expl}, {tuple(r.values()) for r in scores}


def _finished_latents(registry: Registry) -> set[int]:
    """Latents whose explanation and scores are in the registry (rows are written per finished latent)."""
    rows = registry.query(
        """SELECT DISTINCT e.latent FROM explanation_scores s JOIN explanations e USING (explanation_id)
           WHERE e.kind = 'explanation' AND e.explainer_model = 'openai/test-explainer'"""
    )
    return {r["latent"] for r in rows}


def _bodies(server) -> list[str]:
    return [json.dumps(r, sort_keys=True) for r in server.requests]


def test_killed_explain_run_resumes_with_the_same_rows(tmp_path, llm_server):
    from medsae.cli.explain import app

    registry = Registry(tmp_path / "registry.duckdb")
    puzzle_experiment(tmp_path / "artifacts", registry, PARAMS)
    reference = Registry(tmp_path / "reference.duckdb")
    shutil.copy(registry.path, reference.path)
    llm_server.set_handler(baseline_handler())
    url = llm_server.url
    args = ["run", "puzzles", "--model", "openai/test-explainer", "--api-base", url, "--scorer",
            "openai/test-scorer", "--scorer-api-base", url, "--concurrency", "2"]  # fmt: skip
    env = {**os.environ, "MEDSAE_QUIET": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

    # the uninterrupted run, for comparison (its own registry and cache)
    runner = CliRunner()
    done = runner.invoke(
        app, [*args, "--registry", str(reference.path)], env={"MEDSAE_LLM_CACHE": str(tmp_path / "reference_cache")}
    )
    assert done.exit_code == 0, done.output
    reference_bodies = _bodies(llm_server)
    llm_server.reset()

    # the same command, killed once some latents are finished: the slower server makes the run (~30 s)
    # outlast the journal's longest flush interval (10 s), so finished latents reach the registry first
    llm_server.set_handler(baseline_handler(), latency_s=0.8)
    env["MEDSAE_LLM_CACHE"] = str(tmp_path / "llm_cache")
    child = subprocess.Popen(
        [sys.executable, "-m", "medsae.cli.main", "explain", *args, "--registry", str(registry.path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    finished: set[int] = set()
    try:
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.2)
            try:
                finished = _finished_latents(registry)
            except MedsaeError:  # the child holds the write lock for a moment
                continue
            if len(finished) >= 2:
                child.send_signal(signal.SIGKILL)
                break
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    finished = _finished_latents(registry)
    assert 2 <= len(finished) < 8
    killed_bodies = _bodies(llm_server)
    llm_server.reset()
    llm_server.set_handler(baseline_handler(), latency_s=0.0)

    res = runner.invoke(
        app, [*args, "--registry", str(registry.path)], env={"MEDSAE_LLM_CACHE": env["MEDSAE_LLM_CACHE"]}
    )
    assert res.exit_code == 0, res.output
    assert "latents done 8/8" in res.output
    rerun_bodies = _bodies(llm_server)

    # the rerun asked only for what the killed run had not received: a request may repeat only if it
    # was in flight when the process died (at most --concurrency of them)
    repeated = set(rerun_bodies) & set(killed_bodies)
    print(
        f"figures: killed after {len(finished)} finished latents and {len(killed_bodies)} requests; rerun sent "
        f"{len(rerun_bodies)} requests ({len(repeated)} repeated), uninterrupted run {len(reference_bodies)}"
    )
    assert len(repeated) <= 2
    assert set(killed_bodies) | set(rerun_bodies) == set(reference_bodies)
    assert len(rerun_bodies) < len(reference_bodies) - 2 * len(finished)
    # and the registry holds exactly the rows of the uninterrupted run, each once
    assert _rows(registry) == _rows(reference)
    n = registry.query("SELECT count(*) AS n, count(DISTINCT explanation_id) AS d FROM explanations")[0]
    assert n["n"] == n["d"] == len(_rows(reference)[0])


def _stage_context(tmp_path: Path, dirs: dict[str, Path], url: str, name: str) -> StageContext:
    params = PARAMS | {
        "explainer_model": "openai/test-explainer", "explainer_api_base": url,
        "scorer_model": "openai/test-scorer", "scorer_api_base": url, "concurrency": 1,
    }  # fmt: skip
    return StageContext(
        kind="interpret",
        key="interpret-key",
        spec=InterpretSpec.model_validate(params),
        out_dir=tmp_path / name / "out",
        work_dir=tmp_path / name / "work",
        inputs={k: dirs[k] for k in ("summarize", "slices", "encode")},
        input_keys={k: f"{k}-key" for k in ("summarize", "slices", "encode")},
        seed=0,
        quiet=True,
    )


def _key_revoked_after(n: int, then):
    """Answers ``then`` for ``n`` requests, then 401 (the provider rejects the key)."""
    lock, count = threading.Lock(), [0]

    def handle(request: dict) -> tuple:
        with lock:
            count[0] += 1
            late = count[0] > n
        return (401, error_json(401, "key revoked")) if late else then(request)

    return handle


def test_crashed_interpret_stage_resumes_from_its_work_folder(tmp_path, llm_server, monkeypatch):
    from medsae.interp.stage import run_interpret

    registry = Registry(tmp_path / "registry.duckdb")
    dirs = puzzle_experiment(tmp_path / "artifacts", registry, PARAMS, n_scans=40)
    url = llm_server.url
    llm_server.set_handler(baseline_handler())

    monkeypatch.setenv("MEDSAE_LLM_CACHE", str(tmp_path / "reference_cache"))
    reference = run_interpret(_stage_context(tmp_path, dirs, url, "reference")).tables
    n_latents = len({r["latent"] for r in reference["explanations"] if r["kind"] == "explanation"})
    assert n_latents == 8 and {r["kind"] for r in reference["explanations"]} == {
        "explanation",
        "shuffled",
        "best_attribute",
    }
    llm_server.reset()

    monkeypatch.setenv("MEDSAE_LLM_CACHE", str(tmp_path / "cache_a"))
    ctx = _stage_context(tmp_path, dirs, url, "stage")
    llm_server.set_handler(_key_revoked_after(n_latents + 8 * 3, baseline_handler()))  # explain + ~3 latents
    with pytest.raises(MedsaeError, match="rejected the API key"):
        run_interpret(ctx)
    parts = sorted((ctx.work_dir / "finished").glob("part-*.json"))
    finished = {x for p in parts for x in json.loads(p.read_text())["latents"]}
    assert 1 <= len(finished) < n_latents

    llm_server.reset()
    llm_server.set_handler(baseline_handler())
    monkeypatch.setenv("MEDSAE_LLM_CACHE", str(tmp_path / "cache_b"))  # empty: only the journal can help
    resumed = run_interpret(_stage_context(tmp_path, dirs, url, "stage"))
    explain_requests = [r for r in llm_server.requests if task_of(r).startswith("explain")]
    assert len(explain_requests) == n_latents - len(finished)
    assert resumed.summary["done"] == n_latents
    for table, key in (("explanations", "explanation_id"), ("explanation_scores", "score_id")):
        got = {r[key]: r for r in resumed.tables[table]}
        want = {r[key]: r for r in reference[table]}
        assert got.keys() == want.keys()
        for k, row in want.items():
            assert {c: got[k][c] for c in row if c != "created_at"} == pytest.approx(row), (table, k)

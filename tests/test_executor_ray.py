"""The Ray executor: the demo spec (shrunk) run on a local 2-CPU Ray cluster equals the local executor's run.

A real Ray cluster (``ray.init`` in this process: a GCS, a raylet and worker processes), the real
`medsae exp run` command (the typer app, in this process), a real registry and artifacts; nothing of
medsae is mocked. The demo is shrunk with ``--set`` overrides (6 small phantom subjects, 32 px input,
16-slice embed shards, few epochs and latents) so both runs fit in well under a minute on 2 cores; the
full demo takes ~60 s on a quiet machine with the local executor alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest
import yaml

ray = pytest.importorskip("ray")

from llm_server import baseline_handler, llm_server_fixture  # noqa: E402, F401 (the llm_server fixture)
from typer.testing import CliRunner  # noqa: E402

from medsae.cli.main import app  # noqa: E402
from medsae.errors import MedsaeError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: metrics and JSON fields that measure time or speed: they differ between any two runs
TIMING_WORDS = ("seconds", "_per_s", "wall", "elapsed", "latency")
#: run accounting in the interpret summary: the Ray executor's tasks ask the LLM, the stage then reads the cache
RUN_ACCOUNTING = ("llm_calls", "cache_hits")
#: the demo spec made small (every field is one the demo sets or a stage's own knob)
SHRINK = {
    "data.phantom": {"subjects": 6, "seed": 0, "shape": [24, 24, 32]},
    "data.size": 32,
    "embed.input_size": 32,
    "embed.pretrained": False,
    "embed.batch_size": 16,
    "embed.shard_size": 16,  # several shards, so the embed stage is split across the workers
    "sae.d_sae": 32,
    "sae.k": 4,
    "sae.epochs": 3,
    "sae.dead_after": 100,
    "eval.recovery_ns": [1, 5],
    "eval.retrieval_refs": 20,
    "eval.mono_null_draws": 10,
    "eval.plots": False,
    "interpret.max_latents": 6,
    "interpret.detect": False,
    "interpret.ranking": False,
    "interpret.bootstrap": 20,
    "interpret.permutations": 20,
    "interpret.simulate_random": 4,
    "interpret.shuffled_min": 2,
    "interpret.min_active": 3,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Both executors size torch to 1 thread (floats depend on the thread count); 2 shards run at once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSAE_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster with 2 CPU workers (short temp folder: Ray's socket paths have a length limit)."""
    import tempfile

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _spec(tmp: Path, data: Path) -> Path:
    spec = yaml.safe_load((ROOT / "experiments" / "demo.yaml").read_text())
    spec["artifacts"] = str(tmp / "artifacts")
    spec["data"]["root"] = str(data)
    path = tmp / "demo.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(spec: Path, *extra: str) -> None:
    sets = [arg for field, value in SHRINK.items() for arg in ("--set", f"{field}={json.dumps(value)}")]
    args = ["exp", "run", str(spec), *sets, "--registry", str(spec.parent / "registry.duckdb"), "-q", *extra]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise AssertionError(f"exp run {' '.join(extra)} failed: {result.output}\n{result.exception!r}")


def _query(registry: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(registry), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _stage_keys(registry: Path) -> dict[str, str]:
    return dict(_query(registry, "SELECT kind, stage_key FROM experiment_stages"))


def _metrics(registry: Path) -> dict[tuple, float | None]:
    rows = _query(
        registry,
        """SELECT es.kind, m.split, m.name, coalesce(m.target, ''), coalesce(m.n_features, -1), m.value
           FROM experiment_stages es JOIN metrics m ON m.stage_key = es.stage_key""",
    )
    return {tuple(key): value for *key, value in rows if not any(w in key[2] for w in TIMING_WORDS)}


def _timed(name: object) -> bool:
    return isinstance(name, str) and (any(w in name for w in TIMING_WORDS) or name in RUN_ACCOUNTING)


def _untimed(value):
    """A JSON value without the fields (and metric rows, ``{"name": ..., "value": ...}``) that measure time."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not _timed(k)}
    if isinstance(value, list):
        return [_untimed(v) for v in value if not (isinstance(v, dict) and _timed(v.get("name")))]
    return value


def _files(registry: Path) -> dict[tuple[str, str], str]:
    """(stage kind, file) -> sha256 of every registered artifact file (read back from disk here)."""
    import hashlib

    out = {}
    rows = _query(
        registry,
        """SELECT s.kind, s.artifact_dir, a.path FROM artifacts a JOIN stages s USING (stage_key)""",
    )
    for kind, folder, path in rows:
        file = registry.parent / folder / path
        out[(kind, path)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def _artifact(registry: Path, kind: str, path: str) -> Path:
    folder = _query(registry, f"SELECT artifact_dir FROM stages WHERE kind = '{kind}'")[0][0]
    return registry.parent / folder / path


def _json_file(registry: Path, kind: str, path: str):
    return json.loads(_artifact(registry, kind, path).read_text())


def _untimed_table(registry: Path, kind: str, path: str):
    """A parquet file's rows, in file order, without the columns that measure time."""
    import pyarrow.parquet as pq

    table = pq.read_table(_artifact(registry, kind, path))
    return table.drop_columns([c for c in table.column_names if any(w in c for w in TIMING_WORDS)])


def _compare(local: Path, other: Path, kinds: tuple[str, ...] = ()) -> None:
    """Same keys, same metric rows, byte-identical files (JSON files that record timings: equal without them),
    of every stage (``kinds``: of those stages)."""
    keys_local, keys_other = _stage_keys(local), _stage_keys(other)
    assert keys_local == keys_other
    assert len(keys_local) == 8  # slices, embed, train, encode, ground, evaluate, summarize, interpret
    built = set(kinds or keys_local)
    metrics_local, metrics_other = _metrics(local), _metrics(other)
    assert {k: v for k, v in metrics_local.items() if k[0] in built} == metrics_other
    files_local = {k: v for k, v in _files(local).items() if k[0] in built}
    files_other = _files(other)
    assert files_local.keys() == files_other.keys()
    differ = sorted(k for k in files_local if files_local[k] != files_other[k])
    for kind, path in differ:
        if path.endswith(".parquet"):
            assert _untimed_table(local, kind, path).equals(_untimed_table(other, kind, path)), (kind, path)
        else:
            assert path.endswith(".json"), f"{kind}/{path} differs between the executors"
            assert _untimed(_json_file(local, kind, path)) == _untimed(_json_file(other, kind, path)), (kind, path)
    assert len(differ) < len(files_local) / 2  # most files are byte-identical (the rest differ in timings only)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    data = tmp_path_factory.mktemp("data") / "phantom"
    # the data folder first (phantom and split file): the run that creates the split file writes its
    # tables from memory (pandas object strings), every later run reads it back (arrow strings)
    _run(_spec(tmp_path_factory.mktemp("prime"), data), "--executor", "local", "--only", "slices")
    spec = _spec(tmp, data)
    _run(spec, "--executor", "local")
    return spec, data


@pytest.mark.usefixtures("cluster")
def test_ray_executor_builds_the_same_stages_as_the_local_one(local_run, tmp_path):
    local_spec, data = local_run
    spec = _spec(tmp_path, data)
    _run(spec, "--executor", "ray")
    local, other = local_spec.parent / "registry.duckdb", spec.parent / "registry.duckdb"
    _compare(local, other)
    # the embed stage really was split: one shard per 16 slices, all in the manifest
    manifest = _json_file(other, "embed", "manifest.json")
    assert len(manifest["shards"]) == -(-manifest["n"] // 16) > 2


def _kill_first_shard_worker(stop: threading.Event, killed: list[int]) -> None:
    """Kill -9 the first worker process seen embedding a shard (Ray names the process after its task)."""
    while not stop.is_set() and not killed:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"ray::embed_shard_task" in cmdline:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.02)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker process through /proc")
@pytest.mark.usefixtures("cluster")
def test_a_worker_killed_mid_shard_is_retried_and_the_run_completes(local_run, tmp_path):
    local_spec, data = local_run
    spec = _spec(tmp_path, data)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_shard_worker, args=(stop, killed), daemon=True)
    killer.start()
    try:
        _run(spec, "--executor", "ray", "--only", "slices", "--only", "embed")  # the kill hits an embed shard
    finally:
        stop.set()
        killer.join()
    assert killed, "no embed shard task was seen running"
    _compare(local_spec.parent / "registry.duckdb", spec.parent / "registry.duckdb", kinds=("slices", "embed"))


@pytest.mark.usefixtures("cluster")
def test_workers_ask_a_real_http_llm_once_per_question_and_the_driver_only_reads(local_run, tmp_path, llm_server):
    """Real litellm in the Ray workers against an OpenAI-compatible server on 127.0.0.1 (the offline rules
    served over HTTP). The cluster was started before the API key was set, as a cluster always is: the
    workers get it from the executor. No question is asked twice (shuffled baselines and ranking
    candidates span latents, yet the workers ask what a whole run asks); the stage on the driver asks
    nothing."""
    _, data = local_run
    llm_server.set_handler(baseline_handler())
    models = {"interpret.explainer_model": "openai/test-explainer", "interpret.scorer_model": "openai/test-scorer"}
    sets = [f"{field}={json.dumps(value)}" for field, value in models.items()]
    sets += [f"interpret.{role}_api_base={json.dumps(llm_server.url)}" for role in ("explainer", "scorer")]
    sets += ["interpret.ranking=true", "interpret.detect=true"]  # questions whose choices span latents
    spec = _spec(tmp_path, data)
    _run(spec, "--executor", "ray", *[arg for s in sets for arg in ("--set", s)])

    bodies = [json.dumps(r, sort_keys=True) for r in llm_server.requests]
    assert bodies and len(set(bodies)) == len(bodies)  # one request per distinct question
    assert set(llm_server.auth_headers) == {"Bearer sk-medsae-test-dummy-key"}
    summary = _json_file(spec.parent / "registry.duckdb", "interpret", "summary.json")
    assert summary["llm_calls"] == 0 and summary["cache_hits"] > 0  # the driver read every answer
    n_explained = _query(
        spec.parent / "registry.duckdb",
        "SELECT count(*) FROM explanations WHERE kind = 'explanation' AND explainer_model = 'openai/test-explainer'",
    )[0][0]
    assert n_explained == SHRINK["interpret.max_latents"]


@pytest.mark.usefixtures("cluster")
def test_gpu_tasks_take_their_share_of_cpus_and_do_not_reuse_workers(monkeypatch):
    """Task options on a (pretended) 8-GPU, 32-CPU cluster: one GPU and 4 CPUs per GPU task, its torch threads
    sized to those CPUs, and its worker process declared single-use; CPU tasks keep a local run's threads."""
    from medsae.embed.config import EmbedSpec
    from medsae.executor.ray import RayExecutor
    from medsae.stage import StageContext

    monkeypatch.setenv("MEDSAE_THREADS", "6")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")  # a credential litellm reads: every task carries it
    executor = RayExecutor()  # the test's cluster is running already: the executor joins it
    executor.gpus, executor.cpus, executor.node_cpus = 8, 32, 32
    ctx = StageContext(
        kind="embed", key="k", out_dir=Path("o"), work_dir=Path("w"), inputs={}, input_keys={}, seed=0,
        spec=EmbedSpec(device="cuda"),
    )  # fmt: skip
    gpu = executor._options("embed", ctx)
    assert (gpu["num_gpus"], gpu["num_cpus"], executor._threads(gpu)) == (1, 4, 4)
    cpu = executor._options("summarize", dataclasses.replace(ctx, kind="summarize", spec=None))
    assert "num_gpus" not in cpu and (cpu["num_cpus"], executor._threads(cpu)) == (6, 6)
    assert (
        gpu["runtime_env"]["env_vars"]["ANTHROPIC_API_KEY"]
        == "sk-test"
        == cpu["runtime_env"]["env_vars"]["ANTHROPIC_API_KEY"]
    )
    declared = []

    def remote(*args, **kwargs):  # ray.remote(fn) or ray.remote(**options)(fn)
        declared.append(kwargs)
        return _NoSubmit() if args else (lambda fn: _NoSubmit())

    monkeypatch.setattr(executor.ray, "remote", remote)
    executor._submit(len, gpu, "x")
    executor._submit(len, cpu, "x")
    assert declared == [{"max_calls": 1}, {}]


class _NoSubmit:
    """Stands in for a Ray remote function: records nothing, submits nothing."""

    def options(self, **_: object) -> _NoSubmit:
        return self

    def remote(self, *_: object) -> None:
        return None


def test_without_ray_the_executor_says_how_to_install_it(monkeypatch):
    from medsae.executor.base import make_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as it does where Ray is not installed
    with pytest.raises(MedsaeError, match=r"pip install medsae\[ray\]") as err:
        make_executor("ray")
    assert "\n" not in str(err.value)


def test_the_executor_in_the_spec_changes_no_key_nor_the_experiment_id(tmp_path):
    from medsae.plan import plan_experiment
    from medsae.spec import load_specs

    spec = _spec(tmp_path, tmp_path / "phantom")
    plain = load_specs(spec)[0]
    on_ray = load_specs(spec, ["executor=ray", "ray_address=auto"])[0]
    assert (on_ray.executor, on_ray.ray_address, plain.executor) == ("ray", "auto", "local")
    assert on_ray.spec_hash() == plain.spec_hash()
    keys = {k: n.key for k, n in plan_experiment(plain, prepare_data=False).nodes.items()}
    assert keys == {k: n.key for k, n in plan_experiment(on_ray, prepare_data=False).nodes.items()}
    assert not {"executor", "ray_address"} & set(json.loads(on_ray.canonical_json()))  # not in the stored spec

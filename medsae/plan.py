"""The stage graph: keys, what is done, what runs next. The only place that decides what runs.

Every stage of an experiment gets a key::

    key = sha256(canonical_json({kind, code_version, params, seed, upstream: {kind: key}, inputs}))

where ``params`` is the stage's spec section without execution-only fields (and the fields its
row of :data:`medsae.stages.STAGE_TABLE` excludes) and ``inputs`` names external content (the
dataset manifest). ``upstream`` names the stage's upstream stages and those of its optional upstream
stages that the experiment has (``ground`` for ``interpret``), so an experiment without them keeps
its keys. The stage kinds, what each reads and which function builds it are the rows of
that table; the planner names no stage itself. A stage is *done* when the registry has its row and
its artifact folder exists. Running a stage:

1. the stage function writes into ``artifacts/<kind>/.tmp/<key>/`` (resumable state lives in
   ``artifacts/<kind>/.work/<key>/`` and survives a killed run);
2. the planner saves the returned rows next to the outputs (``_registry/``), renames the folder to
   ``artifacts/<kind>/<key>/`` and only then writes the registry rows in one transaction.

A run killed at any point is resumed by running the same command again: a renamed folder whose
rows are missing is registered from its ``_registry/`` files; anything else restarts from the
stage's own checkpoints. Sweeps share every stage whose key is the same, and train stages that
share one embedding are handed to the trainer together so it reads the data once.

Several processes may run on one registry and one artifacts folder at once. A stage is built
under an OS file lock ``artifacts/<kind>/.locks/<key>.lock`` (released by the kernel even on
``kill -9``): a second process waits for it, then finds the stage done and reuses it, so a
stage is never built twice at the same time nor read half-written. Before any work, every place
a run writes to (registry, artifacts, generated data) is probed, so a read-only folder is one
line, not a traceback after an hour.

Stage functions run through an executor (:mod:`medsae.executor`): in this process by default, or as
tasks on a Ray cluster (``--executor ray``); either way this process alone renames the folders and
writes the registry, so keys, folders and rows are the same whichever executor built a stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from medsae.errors import MedsaeError, MissingInputError
from medsae.executor.base import Executor
from medsae.executor.local import LocalExecutor
from medsae.paths import resolve_stored, to_stored
from medsae.registry import Registry, insert_rows
from medsae.registry.db import rows_to_arrow
from medsae.registry.queries import experiment_stage_dirs, find_experiment  # re-exported (moved)
from medsae.spec import ExperimentSpec, canonical_json, sha256_text
from medsae.specbase import Section
from medsae.stage import (
    Metric,
    StageContext,
    StageResult,
    check_writable_file,
    check_writable_folder,
    exclusive,
    make_tree_shareable,
    metric_rows,
)
from medsae.stages import STAGE_TABLE, STAGES, StageDef, stage_def
from medsae.threads import thread_count

#: Registry tables a stage may return, and the column holding the producing stage's key.
_KEY_COLUMN: dict[str, str] = {
    "slices": "slices_key",
    "slice_structures": "slices_key",
    "ingest_skips": "slices_key",
    "metrics": "stage_key",
    "latents": "stage_key",
    "latent_grounding": "stage_key",
    "example_sets": "stage_key",
    "explanations": "stage_key",
    "explanation_scores": "",
    "llm_calls": "",
    "prompts": "",
}
#: Tables whose rows belong to one stage run and are replaced when the stage is forced.
_REPLACED_ON_FORCE = (
    "slices", "slice_structures", "ingest_skips", "metrics", "latents", "latent_grounding", "example_sets",
)  # fmt: skip


def code_version(kind: str) -> str:
    """The stage module's ``CODE_VERSION`` (part of every key)."""
    return stage_def(kind).code_version()


@dataclass
class StageNode:
    """One stage of one experiment: its key and the folders it is built in.

    The finished folder is ``artifacts/<kind>/<key>/`` unless ``folder`` names another one
    (``medsae data ingest --out``); the temporary, work and lock paths sit beside it in
    ``.tmp/``, ``.work/`` and ``.locks/``, named after it.
    """

    kind: str
    key: str
    params: dict[str, Any]  # the section as it enters the key
    spec: Section | None  # the typed section handed to the stage (``ctx.spec``; paths resolved)
    upstream: dict[str, str]  # upstream kind -> key
    seed: int
    artifacts_root: Path
    inputs_missing: str | None = None  # why the stage cannot run (e.g. data folder absent)
    inputs: dict[str, Path] = field(default_factory=dict)  # upstream kind -> its finished folder
    experiment: str = ""  # the experiment that planned it (the first one, when a sweep shares it)
    folder: Path | None = None  # the finished folder, when not artifacts/<kind>/<key>

    @property
    def final_dir(self) -> Path:
        return self.folder if self.folder is not None else self.artifacts_root / self.kind / self.key

    @property
    def tmp_dir(self) -> Path:
        return self.final_dir.parent / ".tmp" / self.final_dir.name

    @property
    def work_dir(self) -> Path:
        return self.final_dir.parent / ".work" / self.final_dir.name

    @property
    def lock_path(self) -> Path:
        return self.final_dir.parent / ".locks" / f"{self.final_dir.name}.lock"


@dataclass
class ExperimentPlan:
    spec: ExperimentSpec
    nodes: dict[str, StageNode] = field(default_factory=dict)  # kind -> node

    @property
    def experiment_id(self) -> str:
        return self.spec.spec_hash()


def _dataset_input(spec: ExperimentSpec) -> tuple[str, str | None]:
    """The dataset's content digest, generating the phantom first when the spec asks for one."""
    from medsae.data.totalsegmentator import dataset_manifest, ensure_dataset

    try:
        root = ensure_dataset(spec.resolved_data())
    except MissingInputError as exc:
        return "missing", str(exc)
    return dataset_manifest(root), None


#: External content a key can name (``StageDef.inputs``): name -> (digest, why it is missing) of a spec.
_EXTERNAL_INPUTS: dict[str, Callable[[ExperimentSpec], tuple[str, str | None]]] = {"dataset": _dataset_input}


def stage_key(d: StageDef, params: dict[str, Any], seed: int, upstream: dict[str, str], inputs: dict[str, str]) -> str:
    """The key of one stage: the sha256 of the canonical JSON payload in the module docstring."""
    payload = {
        "kind": d.kind,
        "code_version": d.code_version(),
        "params": params,
        "seed": seed,
        "upstream": upstream,
        "inputs": inputs,
    }
    return sha256_text(canonical_json(payload))


def plan_experiment(
    spec: ExperimentSpec, *, prepare_data: bool = True, only: Collection[str] | None = None
) -> ExperimentPlan:
    """Compute every stage key of one experiment (``only``: those kinds and their upstream stages)."""
    plan = ExperimentPlan(spec)
    needed = _with_upstream(only) if only is not None else set(STAGES)
    table = [d for d in STAGE_TABLE if d.kind in needed and d.planned(spec)]
    names = {name for d in table for name in d.inputs}
    external = {n: _EXTERNAL_INPUTS[n](spec) if prepare_data else ("unknown", None) for n in sorted(names)}
    for d in table:
        ups = {up: plan.nodes[up] for up in d.upstream}
        ups |= {up: plan.nodes[up] for up in d.optional_upstream if up in plan.nodes}  # planned ones only
        params = d.key_params(d.spec_section(spec))
        upstream = {up: node.key for up, node in ups.items()}
        key = stage_key(d, params, spec.seed, upstream, {n: external[n][0] for n in d.inputs})
        node = StageNode(d.kind, key, params, d.run_section(spec), upstream, spec.seed, spec.artifacts_dir)
        node.inputs = {up: n.final_dir for up, n in ups.items()}
        node.experiment = spec.name
        missing = [external[n][1] for n in d.inputs if external[n][1]]
        if missing:
            node.inputs_missing = missing[0]
        elif any(n.inputs_missing for n in ups.values()):
            node.inputs_missing = "upstream input missing"
        plan.nodes[d.kind] = node
    return plan


def _with_upstream(kinds: Collection[str]) -> set[str]:
    """``kinds`` and every stage they read from, directly or not."""
    needed: set[str] = set()
    todo = list(kinds)
    while todo:
        kind = todo.pop()
        if kind not in needed:
            needed.add(kind)
            todo.extend(stage_def(kind).reads())
    return needed


def check_write_places(specs: list[ExperimentSpec], registry: Registry, *, data: bool = True) -> None:
    """Probe every place a run writes to; the first problem is one line naming the path.

    The registry file (and its folder, where DuckDB keeps its write-ahead log), each artifacts
    folder and its existing stage folders, and, when ``data`` and the spec generates a phantom
    that is not complete yet, the data folder. Nothing is written by the check.
    """
    from medsae.data.totalsegmentator import check_dataset_writable

    check_writable_file(registry.path, "the registry")
    seen: set[Path] = set()
    for spec in specs:
        root = spec.artifacts_dir
        if root in seen:
            continue
        seen.add(root)
        check_writable_folder(root, "the artifacts folder")
        for kind in STAGES:
            if (root / kind).is_dir():
                check_writable_folder(root / kind, f"the artifacts folder of stage '{kind}'")
        if data:
            check_dataset_writable(spec.resolved_data())


# -- registry helpers -----------------------------------------------------------------------------


def done_keys(registry: Registry, keys: list[str]) -> set[str]:
    """Keys that have a registry row and an artifact folder."""
    if not keys or not registry.path.exists():
        return set()
    rows = registry.query(
        "SELECT stage_key, artifact_dir FROM stages WHERE status = 'done' AND stage_key IN (SELECT unnest(?))",
        [keys],
    )
    return {
        r["stage_key"] for r in rows if r["artifact_dir"] and resolve_stored(r["artifact_dir"], registry.path).is_dir()
    }


def stage_status(registry: Registry, plan: ExperimentPlan) -> dict[str, str]:
    """kind -> 'done' / 'pending' / 'blocked: <why>' for one planned experiment."""
    done = done_keys(registry, [n.key for n in plan.nodes.values()])
    status = {}
    for kind, node in plan.nodes.items():
        if node.key in done:
            status[kind] = "done"
        elif node.inputs_missing:
            status[kind] = f"blocked: {node.inputs_missing}"
        else:
            status[kind] = "pending"
    return status


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for pkg in ("medsae", "torch", "timm", "transformers", "duckdb", "litellm", "numpy", "nibabel"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return versions


def _host() -> dict[str, Any]:
    host: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": thread_count(),  # what medsae sized its pools to (affinity, cgroup quota, MEDSAE_THREADS)
    }
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            host["gpu"] = torch.cuda.get_device_name(0)
    return host


def register_experiment(registry: Registry, plan: ExperimentPlan, spec_path: str | None, sweep: str | None) -> None:
    """Record the experiment and point it at the stage keys of this plan (idempotent).

    The experiment id is the spec hash, but its stage keys also depend on the code version and
    the dataset content, so a later plan of the same spec may have new keys: they replace the
    old ones, and ``show``/``report`` always read the stages the current plan built.
    """
    spec = plan.spec
    with registry.write() as con:
        insert_rows(
            con,
            "experiments",
            [
                {
                    "experiment_id": plan.experiment_id,
                    "name": spec.name,
                    "spec_json": spec.canonical_json(),
                    "spec_hash": plan.experiment_id,
                    "spec_path": to_stored(spec_path, registry.path) if spec_path else None,
                    "sweep_name": sweep,
                    "git_commit": _git_commit(),
                    "versions_json": json.dumps(_versions()),
                    "host_json": json.dumps(_host()),
                }
            ],
        )
        insert_rows(
            con,
            "experiment_stages",
            [{"experiment_id": plan.experiment_id, "kind": k, "stage_key": n.key} for k, n in plan.nodes.items()],
            replace=True,
        )


def _file_digests(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith("_registry/"):
            continue
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        rows.append({"path": rel, "sha256": digest.hexdigest(), "bytes": path.stat().st_size})
    return rows


# -- persisting a stage's result next to its outputs ----------------------------------------------


def _save_result(node: StageNode, result: StageResult, seconds: float, started: float) -> None:
    reg_dir = node.tmp_dir / "_registry"
    reg_dir.mkdir(parents=True, exist_ok=True)
    for table, rows in result.tables.items():
        if table not in _KEY_COLUMN:
            raise MedsaeError(f"stage {node.kind} returned rows for unknown registry table '{table}'")
        arrow = rows if isinstance(rows, pa.Table) else rows_to_arrow(rows)
        pq.write_table(arrow, reg_dir / f"{table}.parquet")
    meta = {
        "metrics": metric_rows(node.key, result.metrics),
        "summary": result.summary,
        "device": result.device,
        "seconds": seconds,
        "started": started,
        "finished": time.time(),
    }
    (reg_dir / "result.json").write_text(json.dumps(meta, default=str))


def _register_stage(registry: Registry, node: StageNode, forced: bool) -> None:
    """Write the registry rows of a completed (renamed) stage folder in one transaction."""
    folder = node.final_dir
    reg_dir = folder / "_registry"
    meta = json.loads((reg_dir / "result.json").read_text())
    digests = _file_digests(folder)
    with registry.write() as con:
        if forced:
            for table in _REPLACED_ON_FORCE:
                con.execute(f"DELETE FROM {table} WHERE {_KEY_COLUMN[table]} = ?", [node.key])
            con.execute("DELETE FROM artifacts WHERE stage_key = ?", [node.key])
            con.execute("DELETE FROM stages WHERE stage_key = ?", [node.key])
        for table_file in sorted(reg_dir.glob("*.parquet")):
            table = table_file.stem
            arrow = pq.read_table(table_file)
            key_col = _KEY_COLUMN[table]
            if key_col and key_col not in arrow.column_names and arrow.num_rows:
                arrow = arrow.append_column(key_col, pa.array([node.key] * arrow.num_rows, pa.string()))
            insert_rows(con, table, arrow)
        insert_rows(con, "metrics", meta["metrics"])
        insert_rows(con, "artifacts", [dict(r, stage_key=node.key) for r in digests])
        insert_rows(
            con,
            "stages",
            [
                {
                    "stage_key": node.key,
                    "kind": node.kind,
                    "code_version": code_version(node.kind),
                    "params_json": canonical_json(node.params),
                    "upstream_keys": list(node.upstream.values()),
                    "status": "done",
                    "started_at": _ts(meta["started"]),
                    "finished_at": _ts(meta["finished"]),
                    "artifact_dir": to_stored(folder, registry.path),  # relative next to the registry
                    "seconds": meta["seconds"],
                    "device": meta.get("device"),
                    "summary_json": json.dumps(meta.get("summary") or {}, default=str),
                }
            ],
        )


def _ts(epoch: float) -> Any:
    import datetime as dt

    return dt.datetime.fromtimestamp(epoch, tz=dt.timezone.utc)


# -- running -------------------------------------------------------------------------------------


@dataclass
class StageOutcome:
    kind: str
    key: str
    action: str  # 'done' (already), 'ran', 'registered' (recovered after a crash), 'waiting' (locked)
    seconds: float = 0.0
    experiments: list[str] = dataclasses.field(default_factory=list)


def _context(node: StageNode, quiet: bool, registry: Registry) -> StageContext:
    if node.tmp_dir.exists():
        shutil.rmtree(node.tmp_dir)
    node.tmp_dir.mkdir(parents=True)
    node.work_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(
        kind=node.kind,
        key=node.key,
        out_dir=node.tmp_dir,
        work_dir=node.work_dir,
        inputs=dict(node.inputs),
        input_keys=dict(node.upstream),
        seed=node.seed,
        experiment=node.experiment,
        quiet=quiet,
        registry_path=registry.path,
        spec=node.spec,
    )


def _finish(node: StageNode, registry: Registry, forced: bool) -> None:
    make_tree_shareable(node.tmp_dir)  # umask modes, whatever library wrote the files
    if node.final_dir.exists():
        trash = node.final_dir.with_name(node.final_dir.name + ".old")
        if trash.exists():
            shutil.rmtree(trash)
        node.final_dir.rename(trash)
        shutil.rmtree(trash)
    node.tmp_dir.rename(node.final_dir)
    _register_stage(registry, node, forced)
    shutil.rmtree(node.work_dir, ignore_errors=True)


def run_plans(
    plans: list[ExperimentPlan],
    registry: Registry,
    *,
    force: set[str] | None = None,
    only: set[str] | None = None,
    quiet: bool = False,
    spec_path: str | None = None,
    sweep: str | None = None,
    on_event: Callable[[StageOutcome], None] | None = None,
    executor: Executor | None = None,
) -> list[StageOutcome]:
    """Run every missing stage of the planned experiments, stage kind by stage kind.

    ``on_event`` sees every outcome, and a ``waiting`` event (not in the returned list) when
    another process holds a stage's lock. ``executor`` runs the stage functions (default: in this
    process, :class:`~medsae.executor.local.LocalExecutor`); whichever it is, this process alone
    renames the folders and writes the registry.
    """
    force = force or set()
    executor = executor or LocalExecutor()
    unknown = (force | (only or set())) - set(STAGES)
    if unknown:
        raise MedsaeError(f"unknown stage '{sorted(unknown)[0]}' (stages: {', '.join(STAGES)})")
    for plan in plans:  # a stage whose own external input is missing (not an upstream one)
        blocked = [n for n in plan.nodes.values() if n.inputs_missing and stage_def(n.kind).inputs]
        if blocked:
            raise MissingInputError(blocked[0].inputs_missing or "input missing")
    check_write_places([p.spec for p in plans], registry, data=False)
    for plan in plans:
        register_experiment(registry, plan, spec_path, sweep)

    outcomes: list[StageOutcome] = []
    forced_done: set[str] = set()

    def emit(outcome: StageOutcome) -> None:
        if outcome.action != "waiting":
            outcomes.append(outcome)
        if on_event:
            on_event(outcome)

    for d in STAGE_TABLE:
        if only and d.kind not in only:
            continue
        # unique nodes of this kind across the sweep
        by_key: dict[str, StageNode] = {}
        users: dict[str, list[str]] = {}
        for plan in plans:
            node = plan.nodes.get(d.kind)
            if node is None:  # an optional stage this experiment does not have
                continue
            by_key.setdefault(node.key, node)
            users.setdefault(node.key, []).append(plan.spec.name)

        forced = {key for key in by_key if d.kind in force and key not in forced_done}
        todo = _settle(list(by_key.values()), registry, forced, users, emit)
        batches = _batches(d, todo)
        # a concurrent executor gets every batch of the kind at once, the local one a batch at a time
        for group in [batches] if executor.concurrent and batches else [[b] for b in batches]:
            built = _build(
                group, registry, forced, users, emit, quiet=quiet, forced_rows=d.kind in force, executor=executor
            )
            forced_done.update(built)
    return outcomes


def run_stage(
    node: StageNode,
    registry: Registry,
    *,
    force: bool = False,
    quiet: bool = False,
    on_event: Callable[[StageOutcome], None] | None = None,
) -> StageOutcome:
    """Build one planned stage on its own, exactly as :func:`run_plans` builds it (``medsae data ingest``).

    The same lock, temporary folder, rename and registry rows; no experiment is registered.
    Returns the outcome: ``ran``, ``done`` (already) or ``registered`` (recovered after a crash).
    """
    if node.inputs_missing:
        raise MissingInputError(node.inputs_missing)
    check_writable_file(registry.path, "the registry")
    check_writable_folder(node.final_dir.parent, f"the artifacts folder of stage '{node.kind}'")
    outcomes: list[StageOutcome] = []

    def emit(outcome: StageOutcome) -> None:
        if outcome.action != "waiting":
            outcomes.append(outcome)
        if on_event:
            on_event(outcome)

    users = {node.key: [node.experiment] if node.experiment else []}
    forced = {node.key} if force else set()
    todo = _settle([node], registry, forced, users, emit)
    if todo:
        _build([todo], registry, forced, users, emit, quiet=quiet, forced_rows=force, executor=LocalExecutor())
    return outcomes[-1]


def stage_summary(node: StageNode) -> dict[str, Any]:
    """The summary a built stage returned (saved with its rows in ``_registry/result.json``)."""
    meta = json.loads((node.final_dir / "_registry" / "result.json").read_text())
    return dict(meta.get("summary") or {})


def _batches(d: StageDef, todo: list[StageNode]) -> list[list[StageNode]]:
    """Stages built by one call: each alone, or (``run_many``) grouped by their ``batch_by`` upstream."""
    if d.run_many is None or len(todo) < 2:
        return [[node] for node in todo]
    groups: dict[str, list[StageNode]] = {}
    for node in todo:
        groups.setdefault(node.upstream.get(d.batch_by or "", ""), []).append(node)
    return list(groups.values())


def _build(
    batches: list[list[StageNode]],
    registry: Registry,
    forced: set[str],
    users: dict[str, list[str]],
    emit: Callable[[StageOutcome], None],
    *,
    quiet: bool,
    forced_rows: bool,
    executor: Executor,
) -> list[str]:
    """Build batches of stages of one kind under their locks (a batch: one ``run_many`` call when
    several stages); each batch is saved, renamed and registered as soon as the executor finishes it.
    Returns the keys built."""
    with _stage_locks([node for batch in batches for node in batch], users, emit):
        left = {n.key for batch in batches for n in _settle(batch, registry, forced, users, emit, locked=True)}
        batches = [kept for batch in batches if (kept := [n for n in batch if n.key in left])]  # built elsewhere?
        if not batches:
            return []
        d = stage_def(batches[0][0].kind)
        started = time.time()
        ctxs = [[_context(node, quiet, registry) for node in batch] for batch in batches]
        built: list[str] = []
        for i, results, seconds in executor.run(d, ctxs):
            for node, result in zip(batches[i], results, strict=False):
                _save_result(node, result, seconds, started)
                _finish(node, registry, forced=forced_rows)
                emit(StageOutcome(node.kind, node.key, "ran", seconds, users[node.key]))
            built += [node.key for node in batches[i]]
    return built


def _settle(
    nodes: list[StageNode],
    registry: Registry,
    forced: set[str],
    users: dict[str, list[str]],
    emit: Callable[[StageOutcome], None],
    *,
    locked: bool = False,
) -> list[StageNode]:
    """Report the stages that are done (or only need registering); return the ones still to build.

    A renamed folder without registry rows is registered only under the stage's lock (``locked``):
    without it, the folder may be another process's that is writing those rows right now.
    """
    done = done_keys(registry, [node.key for node in nodes])
    rest = []
    for node in nodes:
        if node.key in done and node.key not in forced:
            emit(StageOutcome(node.kind, node.key, "done", experiments=users[node.key]))
        elif locked and node.key not in forced and (node.final_dir / "_registry" / "result.json").is_file():
            _register_stage(registry, node, forced=False)  # renamed, then killed before the rows
            shutil.rmtree(node.work_dir, ignore_errors=True)
            emit(StageOutcome(node.kind, node.key, "registered", experiments=users[node.key]))
        else:
            rest.append(node)
    return rest


@contextlib.contextmanager
def _stage_locks(
    nodes: list[StageNode], users: dict[str, list[str]], emit: Callable[[StageOutcome], None]
) -> Iterator[None]:
    """Hold the lock of every node (in key order, so two processes never wait on each other)."""
    with contextlib.ExitStack() as stack:
        for node in sorted(nodes, key=lambda n: n.key):

            def waiting(node: StageNode = node) -> None:
                emit(StageOutcome(node.kind, node.key, "waiting", experiments=users[node.key]))

            stack.enter_context(exclusive(node.lock_path, f"stage {node.kind} {node.key[:12]}", waiting))
        yield


__all__ = [
    "STAGES",
    "ExperimentPlan",
    "Metric",
    "StageNode",
    "StageOutcome",
    "experiment_stage_dirs",
    "find_experiment",
    "plan_experiment",
    "run_plans",
    "run_stage",
    "stage_key",
    "stage_status",
    "stage_summary",
]

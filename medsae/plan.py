"""The stage graph: keys, what is done, what runs next. The only place that decides what runs.

Every stage of an experiment gets a key::

    key = sha256(canonical_json({kind, code_version, params, seed, upstream: {kind: key}, inputs}))

where ``params`` is the stage's spec section without execution-only fields and ``inputs`` names
external content (the dataset manifest). A stage is *done* when the registry has its row and its
artifact folder exists. Running a stage:

1. the stage function writes into ``artifacts/<kind>/.tmp/<key>/`` (resumable state lives in
   ``artifacts/<kind>/.work/<key>/`` and survives a killed run);
2. the planner saves the returned rows next to the outputs (``_registry/``), renames the folder to
   ``artifacts/<kind>/<key>/`` and only then writes the registry rows in one transaction.

A run killed at any point is resumed by running the same command again: a renamed folder whose
rows are missing is registered from its ``_registry/`` files; anything else restarts from the
stage's own checkpoints. Sweeps share every stage whose key is the same, and train stages that
share one embedding are handed to the trainer together so it reads the data once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from medsae.errors import MedsaeError, MissingInputError
from medsae.interp.config import LLM_ONLY_FIELDS
from medsae.registry import Registry, insert_rows
from medsae.registry.db import rows_to_arrow
from medsae.spec import ExperimentSpec, canonical_json, sha256_text
from medsae.specbase import key_params
from medsae.stage import Metric, StageContext, StageResult, metric_rows

#: Stage kinds in execution order.
STAGES: tuple[str, ...] = ("slices", "embed", "train", "encode", "evaluate", "summarize", "interpret")

#: Upstream stages of each kind.
UPSTREAM: dict[str, tuple[str, ...]] = {
    "slices": (),
    "embed": ("slices",),
    "train": ("embed", "slices"),
    "encode": ("train", "embed"),
    "evaluate": ("encode", "embed", "slices", "train"),
    "summarize": ("encode", "slices", "train"),
    "interpret": ("summarize", "encode", "slices"),
}

#: Module and function implementing each stage.
IMPLEMENTATION: dict[str, str] = {
    "slices": "medsae.data.stage:run_slices",
    "embed": "medsae.embed.stage:run_embed",
    "train": "medsae.sae.stage:run_train",
    "encode": "medsae.sae.stage:run_encode",
    "evaluate": "medsae.eval.stage:run_evaluate",
    "summarize": "medsae.interp.stage:run_summarize",
    "interpret": "medsae.interp.stage:run_interpret",
}

#: Registry tables a stage may return, and the column holding the producing stage's key.
_KEY_COLUMN: dict[str, str] = {
    "slices": "slices_key",
    "slice_structures": "slices_key",
    "ingest_skips": "slices_key",
    "metrics": "stage_key",
    "latents": "stage_key",
    "example_sets": "stage_key",
    "explanations": "stage_key",
    "explanation_scores": "",
    "llm_calls": "",
    "prompts": "",
}
#: Tables whose rows belong to one stage run and are replaced when the stage is forced.
_REPLACED_ON_FORCE = ("slices", "slice_structures", "ingest_skips", "metrics", "latents", "example_sets")


def _load(kind: str) -> tuple[Callable[[StageContext], StageResult], Any]:
    module_name, fn_name = IMPLEMENTATION[kind].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, fn_name), module


def code_version(kind: str) -> str:
    """The stage module's ``CODE_VERSION`` (part of every key)."""
    _, module = _load(kind)
    return str(getattr(module, "CODE_VERSION", "1"))


def stage_params(spec: ExperimentSpec, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params entering the key, full params handed to the stage) for one stage kind."""
    section = {
        "slices": spec.data,
        "embed": spec.embed,
        "train": spec.sae,
        "encode": None,
        "evaluate": spec.eval,
        "summarize": spec.interpret,
        "interpret": spec.interpret,
    }[kind]
    if section is None:
        return {}, {}
    keyed = key_params(section)
    full = section.model_dump(mode="json")
    if kind == "summarize":
        for name in LLM_ONLY_FIELDS:
            keyed.pop(name, None)
    if kind == "slices":
        keyed.pop("phantom", None)  # the dataset manifest identifies the data, not how it was made
    return keyed, full


@dataclass
class StageNode:
    """One stage of one experiment, with its key."""

    kind: str
    key: str
    params: dict[str, Any]
    run_params: dict[str, Any]
    upstream: dict[str, str]
    seed: int
    artifacts_root: Path
    inputs_missing: str | None = None  # why the stage cannot run (e.g. data folder absent)

    @property
    def final_dir(self) -> Path:
        return self.artifacts_root / self.kind / self.key

    @property
    def tmp_dir(self) -> Path:
        return self.artifacts_root / self.kind / ".tmp" / self.key

    @property
    def work_dir(self) -> Path:
        return self.artifacts_root / self.kind / ".work" / self.key


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

    params = spec.data.model_dump(mode="json")
    try:
        root = ensure_dataset(params)
    except MissingInputError as exc:
        return "missing", str(exc)
    return dataset_manifest(root), None


def plan_experiment(spec: ExperimentSpec, *, prepare_data: bool = True) -> ExperimentPlan:
    """Compute every stage key of one experiment."""
    plan = ExperimentPlan(spec)
    root = Path(spec.artifacts)
    manifest, missing = _dataset_input(spec) if prepare_data else ("unknown", None)
    for kind in STAGES:
        keyed, full = stage_params(spec, kind)
        upstream = {up: plan.nodes[up].key for up in UPSTREAM[kind]}
        payload = {
            "kind": kind,
            "code_version": code_version(kind),
            "params": keyed,
            "seed": spec.seed,
            "upstream": upstream,
            "inputs": {"dataset": manifest} if kind == "slices" else {},
        }
        key = sha256_text(canonical_json(payload))
        node = StageNode(kind, key, keyed, full, upstream, spec.seed, root)
        if missing and kind == "slices":
            node.inputs_missing = missing
        elif any(plan.nodes[up].inputs_missing for up in UPSTREAM[kind]):
            node.inputs_missing = "upstream input missing"
        plan.nodes[kind] = node
    return plan


# -- registry helpers -----------------------------------------------------------------------------


def done_keys(registry: Registry, keys: list[str]) -> set[str]:
    """Keys that have a registry row and an artifact folder."""
    if not keys or not registry.path.exists():
        return set()
    rows = registry.query(
        "SELECT stage_key, artifact_dir FROM stages WHERE status = 'done' AND stage_key IN (SELECT unnest(?))",
        [keys],
    )
    return {r["stage_key"] for r in rows if r["artifact_dir"] and Path(r["artifact_dir"]).is_dir()}


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
    }
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            host["gpu"] = torch.cuda.get_device_name(0)
    return host


def register_experiment(
    registry: Registry, plan: ExperimentPlan, spec_path: str | None, sweep: str | None
) -> None:
    """Record the experiment and the keys of its stages (idempotent)."""
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
                    "spec_path": spec_path,
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
            [
                {"experiment_id": plan.experiment_id, "kind": k, "stage_key": n.key}
                for k, n in plan.nodes.items()
            ],
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
                    "artifact_dir": str(folder.resolve()),
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
    action: str  # 'done' (already), 'ran', 'registered' (recovered after a crash)
    seconds: float = 0.0
    experiments: list[str] = dataclasses.field(default_factory=list)


def _context(
    node: StageNode,
    nodes_by_kind: dict[str, StageNode],
    spec: ExperimentSpec,
    quiet: bool,
    registry: Registry,
) -> StageContext:
    if node.tmp_dir.exists():
        shutil.rmtree(node.tmp_dir)
    node.tmp_dir.mkdir(parents=True)
    node.work_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(
        kind=node.kind,
        key=node.key,
        params=node.run_params,
        out_dir=node.tmp_dir,
        work_dir=node.work_dir,
        inputs={up: nodes_by_kind[up].final_dir for up in node.upstream},
        input_keys=dict(node.upstream),
        seed=node.seed,
        experiment=spec.name,
        quiet=quiet,
        registry_path=registry.path,
    )


def _finish(node: StageNode, registry: Registry, forced: bool) -> None:
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
) -> list[StageOutcome]:
    """Run every missing stage of the planned experiments, stage kind by stage kind."""
    force = force or set()
    unknown = (force | (only or set())) - set(STAGES)
    if unknown:
        raise MedsaeError(f"unknown stage '{sorted(unknown)[0]}' (stages: {', '.join(STAGES)})")
    for plan in plans:
        blocked = [n for n in plan.nodes.values() if n.inputs_missing and n.kind == "slices"]
        if blocked:
            raise MissingInputError(blocked[0].inputs_missing or "input missing")
    for plan in plans:
        register_experiment(registry, plan, spec_path, sweep)

    outcomes: list[StageOutcome] = []
    forced_done: set[str] = set()
    for kind in STAGES:
        if only and kind not in only:
            continue
        # unique nodes of this kind across the sweep
        by_key: dict[str, tuple[StageNode, ExperimentPlan]] = {}
        users: dict[str, list[str]] = {}
        for plan in plans:
            node = plan.nodes[kind]
            by_key.setdefault(node.key, (node, plan))
            users.setdefault(node.key, []).append(plan.spec.name)
        done = done_keys(registry, list(by_key))
        todo: list[tuple[StageNode, ExperimentPlan]] = []
        for key, (node, plan) in by_key.items():
            is_forced = kind in force and key not in forced_done
            if key in done and not is_forced:
                outcome = StageOutcome(kind, key, "done", experiments=users[key])
            elif not is_forced and (node.final_dir / "_registry" / "result.json").is_file():
                _register_stage(registry, node, forced=False)  # renamed, then killed before the rows
                shutil.rmtree(node.work_dir, ignore_errors=True)
                outcome = StageOutcome(kind, key, "registered", experiments=users[key])
            else:
                todo.append((node, plan))
                continue
            outcomes.append(outcome)
            if on_event:
                on_event(outcome)
        if not todo:
            continue
        if kind == "train" and len(todo) > 1:
            groups: dict[str, list[tuple[StageNode, ExperimentPlan]]] = {}
            for item in todo:
                groups.setdefault(item[0].upstream["embed"], []).append(item)
            batches = list(groups.values())
        else:
            batches = [[item] for item in todo]
        for batch in batches:
            started = time.time()
            t0 = time.perf_counter()
            ctxs = [_context(node, plan.nodes, plan.spec, quiet, registry) for node, plan in batch]
            if len(batch) > 1:
                from medsae.sae.stage import run_train_many

                results = run_train_many(ctxs)
            else:
                fn, _ = _load(kind)
                results = [fn(ctxs[0])]
            seconds = (time.perf_counter() - t0) / len(batch)
            for (node, _plan), result in zip(batch, results, strict=False):
                is_forced = kind in force
                _save_result(node, result, seconds, started)
                _finish(node, registry, forced=is_forced)
                forced_done.add(node.key)
                outcome = StageOutcome(kind, node.key, "ran", seconds, users[node.key])
                outcomes.append(outcome)
                if on_event:
                    on_event(outcome)
    return outcomes


def find_experiment(registry: Registry, name: str) -> dict[str, Any]:
    """The latest registered experiment with this name; raises a one-line error if unknown."""
    rows = registry.query("SELECT * FROM experiments WHERE name = ? ORDER BY created_at DESC LIMIT 1", [name])
    if not rows:
        raise MedsaeError(f"{registry.path}: no experiment named '{name}' (see `medsae exp list`)")
    return rows[0]


def experiment_stage_dirs(registry: Registry, name: str) -> dict[str, Path]:
    """kind -> artifact folder of the completed stages of the named experiment."""
    exp = find_experiment(registry, name)
    rows = registry.query(
        """SELECT es.kind, s.artifact_dir FROM experiment_stages es
           JOIN stages s ON s.stage_key = es.stage_key WHERE es.experiment_id = ?""",
        [exp["experiment_id"]],
    )
    return {r["kind"]: Path(r["artifact_dir"]) for r in rows}


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
    "stage_status",
]

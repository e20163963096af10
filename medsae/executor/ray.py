"""Run stage functions on a Ray cluster (``medsae exp run SPEC --executor ray [--address auto]``).

Ray schedules; medsae only says what each task needs. This process (the driver) stays the planner: it
prepares every stage's temporary folder, and when a task is finished it saves the rows, renames the
folder and writes the registry, so the registry has one writer and never sees a cluster node. What
runs where:

* ``slices`` runs on the driver (it reads the dataset once and is cheap next to the rest);
* ``embed`` is cut into its shards (:func:`medsae.embed.stage.pending_shards`), one task each, with a
  GPU when the embed device is cuda (or ``auto`` on a cluster with GPUs), else CPUs. A task writes its
  shard into a folder of its own under the stage's work folder; the driver moves it beside the others
  and records it, so a killed run resumes at the shards it lacks, as with the local executor;
* ``train``: each group of SAEs sharing an embedding (one ``run_many`` call) is one task, on a GPU of
  its own when there are GPUs; several groups train at once;
* ``interpret``: the eligible latents are split across tasks that ask the LLM their questions and leave
  the answers in the one LLM cache of the artifacts root (one JSON file per request, written by
  temp file + atomic rename: concurrent writers of the same answer are safe): explanations first, then
  scoring, whose choices across latents (shuffled baselines, ranking candidates) are made over all of
  them, so the tasks ask exactly what one whole run asks. The spec's concurrency and spending cap are
  shared out between the tasks. The stage then runs on the driver, where every answer is in the cache;
* every other stage is one task per ``run`` / ``run_many`` call.

Every worker must see the artifacts folder at the same path (a shared file system on a cluster: NFS,
Lustre, ...): tasks read upstream folders and write their stage's temporary folder there. A worker
lost mid-task (a killed process, a lost node) is retried by Ray up to :data:`MAX_RETRIES` times; a task
starts its output over, so the stage stays content-addressed. Each task sizes torch's CPU pools to
the thread count a local run uses (:func:`medsae.threads.thread_count` on the driver, or
``MEDSAE_THREADS``), because float reductions depend on the thread count: with equal counts the
artifacts are byte-identical to the local executor's. CPU tasks ask Ray for that many CPUs.

Every task carries the driver's settings and LLM credentials (:func:`forwarded_env`) in its Ray runtime
environment, so the workers of a cluster started earlier, or on other nodes, see the same API keys,
offline flags and cache folder. Ray keeps a task's runtime environment in its cluster state: whoever can
read the cluster's dashboard or state API can read those keys; use a cluster only you can reach, or give
the worker nodes their own keys (a variable set on a node is used when the driver has none).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medsae.errors import MedsaeError
from medsae.executor.base import BatchDone
from medsae.executor.local import run_batch
from medsae.stage import StageContext, StageResult
from medsae.stages import StageDef, stage_def
from medsae.threads import THREADS_ENV, apply_thread_limits, thread_count

#: Times Ray reruns a task whose worker died (process killed, node lost); errors raised by a stage are not retried.
MAX_RETRIES = 3
#: Environment variables handed to every task (a cluster's workers do not share the driver's shell, and
#: a cluster started before a variable was set never saw it): medsae's and the model hubs' settings ...
FORWARDED_PREFIXES = ("MEDSAE_", "HF_", "TRANSFORMERS_", "LITELLM_", "TORCH_HOME", "TOKENIZERS_")
#: ... and the LLM providers' credentials and endpoints that litellm reads (OPENAI_API_KEY,
#: ANTHROPIC_API_KEY, AZURE_API_BASE, AWS_SECRET_ACCESS_KEY, ...).
CREDENTIAL_PREFIXES = ("OPENAI_", "ANTHROPIC_", "AZURE_", "AWS_", "VERTEXAI_", "GOOGLE_APPLICATION_CREDENTIALS")
CREDENTIAL_SUFFIXES = ("_API_KEY", "_API_BASE", "_API_VERSION", "_BASE_URL")
#: Stages whose section's ``device`` may put a task on a GPU (encode has no section: it follows the cluster).
_GPU_STAGES = ("embed", "train", "encode", "ground", "evaluate")


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MedsaeError("executor ray: Ray is not installed; pip install medsae[ray]") from None
    return ray


def forwarded_env() -> dict[str, str]:
    """The driver's settings that tasks need (offline flags, caches, thread counts, LLM credentials)."""
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith(FORWARDED_PREFIXES + CREDENTIAL_PREFIXES) or k.endswith(CREDENTIAL_SUFFIXES)
    }


# -- what runs inside a worker ---------------------------------------------------------------------


def _prepare_worker(module: str, threads: int) -> None:
    """Import the stage's module, then size the thread pools as a local run does (same bytes)."""
    importlib.import_module(module)
    os.environ[THREADS_ENV] = str(threads)
    apply_thread_limits()


def _quiet(ctx: StageContext) -> StageContext:
    return dataclasses.replace(ctx, quiet=True)  # no progress bars in worker logs


def batch_task(kind: str, ctxs: list[StageContext], threads: int) -> tuple[list[StageResult], float]:
    """One ``run`` / ``run_many`` call of stage ``kind`` (a Ray task)."""
    d = stage_def(kind)
    _prepare_worker(d.run.split(":")[0], threads)
    return run_batch(d, ctxs)


#: The backbone a worker process loaded last, by its embed section (a CPU worker reused for the next shard
#: keeps it; a GPU task's worker exits after its task, see :meth:`RayExecutor._submit`).
_BACKBONE: dict[str, Any] = {}


def embed_shard_task(ctx: StageContext, shard: int, folder: Path, threads: int) -> tuple[dict, dict]:
    """Embed one shard of an embed stage into ``folder`` (a Ray task)."""
    _prepare_worker("medsae.embed.stage", threads)
    from medsae.embed.backbones import load_backbone
    from medsae.embed.config import EmbedSpec
    from medsae.embed.stage import embed_shards

    spec = ctx.section(EmbedSpec)
    ident = spec.model_dump_json()
    if ident not in _BACKBONE:
        _BACKBONE.clear()  # one model per worker at a time
        _BACKBONE[ident] = load_backbone(spec)
    return embed_shards(ctx, [shard], folder, backbone=_BACKBONE[ident])


def describe_backbone_task(ctx: StageContext, threads: int) -> dict[str, Any]:
    """The backbone's description, when every shard was embedded by an earlier run (a Ray task)."""
    _prepare_worker("medsae.embed.stage", threads)
    from medsae.embed.backbones import load_backbone
    from medsae.embed.config import EmbedSpec
    from medsae.embed.stage import describe

    return describe(load_backbone(ctx.section(EmbedSpec)), 0.0)


def ask_llm_task(ctx: StageContext, latents: list[int], phase: str, threads: int) -> int:
    """Ask the LLM the ``phase`` questions of ``latents`` of an interpret stage; the answers go to the
    shared cache, nothing else is kept (a Ray task). Returns the number of latents."""
    _prepare_worker("medsae.interp.stage", threads)
    from medsae.interp.stage import stage_agent

    stage_agent(ctx).prefetch(latents, phase)
    return len(latents)


def interpret_latents(ctx: StageContext) -> list[int]:
    """The latents an interpret stage explains, in the agent's order."""
    from medsae.interp.config import InterpretSpec
    from medsae.interp.inputs import read_summary, select_latents

    spec = ctx.section(InterpretSpec)
    summarize_dir = Path(ctx.inputs["summarize"])
    if spec.protocol == "study":
        from medsae.interp.study.summarize import read_selection

        return [int(x) for x in read_selection(summarize_dir)["latent"]]
    latents, sets = read_summary(summarize_dir)
    return select_latents(latents, sets, None, spec.max_latents)


# -- the driver ------------------------------------------------------------------------------------


class RayExecutor:
    """Sends stage work to a Ray cluster; this process keeps planning, renaming and registering."""

    name = "ray"
    concurrent = True

    def __init__(self, address: str | None = None) -> None:
        self.ray = import_ray()
        self.threads = thread_count()  # what a local run uses: same thread count, same bytes
        self.env = forwarded_env()  # sent with every task: also reaches a cluster that was already running
        self._owns = False
        if not self.ray.is_initialized():
            self._connect(address)
        resources = self.ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        self.cpus = max(1, int(resources.get("CPU", 1)))
        node_cpus = [int(n["Resources"].get("CPU", 0)) for n in self.ray.nodes() if n.get("Alive")]
        self.node_cpus = max([*node_cpus, 1])

    def _connect(self, address: str | None) -> None:
        kwargs: dict[str, Any] = {"log_to_driver": True}
        if not (address or os.environ.get("RAY_ADDRESS")):
            kwargs["include_dashboard"] = False  # a private local cluster: no web server
        try:
            self.ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MedsaeError(f"executor ray: cannot start or reach the Ray cluster ({where}): {first}") from None
        self._owns = True

    def close(self) -> None:
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()
        self._owns = False

    # -- resources and results

    def _wants_gpu(self, kind: str, ctx: StageContext) -> bool:
        if not self.gpus or kind not in _GPU_STAGES:
            return False
        device = str(getattr(ctx.spec, "device", "auto") or "auto")
        return device == "auto" or device.startswith("cuda")

    def _options(self, kind: str, ctx: StageContext, cpus: int | None = None) -> dict[str, Any]:
        """Ray task options: a GPU and its share of the CPUs where the stage would use one, else its CPUs."""
        options: dict[str, Any] = {
            "max_retries": MAX_RETRIES,
            "retry_exceptions": False,
            "runtime_env": {"env_vars": self.env},
        }
        if self._wants_gpu(kind, ctx):
            per_gpu = max(1, min(self.threads, self.cpus // self.gpus))  # the rendering loader's threads
            return options | {"num_gpus": 1, "num_cpus": per_gpu}
        return options | {"num_cpus": min(cpus or self.threads, self.node_cpus)}

    def _threads(self, options: dict[str, Any]) -> int:
        """Torch threads of a task: a local run's count on CPUs (same bytes), the CPUs it holds beside a GPU."""
        return int(options["num_cpus"]) if options.get("num_gpus") else self.threads

    def _submit(self, fn: Any, options: dict[str, Any], *args: Any) -> Any:
        """Submit ``fn(*args)``. A GPU task's worker process exits after the task (``max_calls=1``, which
        Ray takes only when the function is declared, not from ``.options``): the GPU's memory is freed and
        a reused worker never keeps the device of an earlier task."""
        remote = self.ray.remote(max_calls=1)(fn) if options.get("num_gpus") else self.ray.remote(fn)
        return remote.options(**options).remote(*args)

    def _get(self, ref: Any) -> Any:
        """A task's value; a medsae error raised in the task is raised here as itself (one line)."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, MedsaeError):
                raise cause from None
            raise

    def _as_done(self, refs: list[Any]) -> Iterator[Any]:
        """Each ref as soon as its task is finished; the others are cancelled if the caller stops early."""
        pending = list(refs)
        try:
            while pending:
                ready, pending = self.ray.wait(pending, num_returns=1)
                yield ready[0]
        finally:
            for ref in pending:
                self.ray.cancel(ref, force=True)

    # -- stages

    def run(self, d: StageDef, batches: list[list[StageContext]]) -> Iterator[BatchDone]:
        if d.kind == "slices":
            for i, ctxs in enumerate(batches):
                yield i, *run_batch(d, ctxs)
        elif d.kind == "embed":
            for i, ctxs in enumerate(batches):
                yield i, *self._embed(ctxs[0])
        elif d.kind == "interpret":
            for i, ctxs in enumerate(batches):
                yield i, *self._interpret(d, ctxs[0])
        else:
            options = [self._options(d.kind, ctxs[0]) for ctxs in batches]
            refs = {
                self._submit(batch_task, options[i], d.kind, [_quiet(c) for c in ctxs], self._threads(options[i])): i
                for i, ctxs in enumerate(batches)
            }
            for ref in self._as_done(list(refs)):
                results, seconds = self._get(ref)
                yield refs[ref], results, seconds

    def _embed(self, ctx: StageContext) -> tuple[list[StageResult], float]:
        """Each missing shard in a task of its own; the driver records them and writes the manifest."""
        from medsae.embed.stage import adopt_shards, finish_embed, pending_shards

        t0 = time.perf_counter()
        todo, _ = pending_shards(ctx)
        options = self._options("embed", ctx)
        folders = {s: Path(ctx.work_dir) / "ray" / f"shard-{s:06d}" for s in todo}
        threads = self._threads(options)
        refs = {self._submit(embed_shard_task, options, _quiet(ctx), s, folders[s], threads): s for s in todo}
        described: dict[str, Any] | None = None
        for ref in self._as_done(list(refs)):
            entries, described = self._get(ref)
            adopt_shards(ctx, folders[refs[ref]], entries)
        if described is None:  # every shard was there already
            described = self._get(self._submit(describe_backbone_task, options, _quiet(ctx), threads))
        result = finish_embed(ctx, described, n_new=len(todo))
        return [result], time.perf_counter() - t0

    def _interpret(self, d: StageDef, ctx: StageContext) -> tuple[list[StageResult], float]:
        """The latents' LLM questions split across tasks, explanations first, then scoring (whose
        questions need every explanation), the answers landing in the shared cache; then the stage on
        the driver, which reads every answer from that cache. The spec's concurrency and spending cap
        are shared out between the tasks."""
        from medsae.interp.config import InterpretSpec

        t0 = time.perf_counter()
        latents = interpret_latents(ctx)
        n_tasks = max(1, min(len(latents), self.cpus))
        parts = [p for p in (latents[i::n_tasks] for i in range(n_tasks)) if p]  # round robin: frequent and rare mixed
        spec = ctx.section(InterpretSpec)
        cap = None if spec.max_cost_usd is None else spec.max_cost_usd / len(parts)
        share = {"concurrency": max(1, spec.concurrency // len(parts)), "max_cost_usd": cap}
        task_ctx = _quiet(dataclasses.replace(ctx, spec=spec.model_copy(update=share)))
        options = self._options(d.kind, ctx, cpus=1)
        for phase in ("explain", "score"):
            refs = [self._submit(ask_llm_task, options, task_ctx, part, phase, 1) for part in parts]
            for ref in self._as_done(refs):
                self._get(ref)
        results, _ = run_batch(d, [ctx])
        return results, time.perf_counter() - t0

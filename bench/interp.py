"""Bench of the auto-interpretation agent; prints tables, asserts nothing.

Part 1 — throughput: explain + score N latents (default 1,000) against the local OpenAI-compatible
test server (tests/llm_server.py) answering every call after a fixed latency (default 200 ms)
with the offline baseline's rules (log-probabilities included for the simulator). Two settings:
``headline`` (explain, simulate, shuffled baseline) and ``full`` (plus detection and the 5-way
ranking). Each is run twice: the rerun must make zero calls. Rows are persisted as latents finish,
as ``medsae explain run`` does (``--sink registry``: one registry transaction per batch, counted in
``flushes``; ``--sink none`` keeps them in memory only, to see what persisting costs).
``client_cpu_s`` (CPU time of this process) and ``load_avg`` put the wall time in context on a
shared machine: the client is CPU-bound in litellm's request/response handling (~10-20 ms per
call), not waiting on latency.

Part 2 — quality on the phantom demo: the per-model summary (offline provider vs the shuffled
baseline and the best single attribute) of experiment ``demo`` from a registry; with
``--run-demo`` the demo spec is run first (a few minutes on 2 cores).

    .venv/bin/python bench/interp.py                       # part 1 (about 4 minutes)
    .venv/bin/python bench/interp.py --latents 200 --skip-full
    .venv/bin/python bench/interp.py --demo-registry registry.duckdb   # part 2 from an existing run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    from medsae.interp.config import InterpretSpec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("MEDSAE_QUIET", "1")


def rule_codes(slices: pd.DataFrame, structures: pd.DataFrame, n_latents: int, seed: int) -> sp.csr_matrix:
    """``n_latents`` puzzle latents: each fires (strength U(1, 5)) where a random pair of terms holds
    (pairs holding on fewer than 60 slices are redrawn, so every latent is explainable)."""
    from medsae.interp.metadata import attribute_matrix, slice_attributes

    vocab = sorted(structures["structure"].unique())
    codes = pd.Categorical(structures["structure"], vocab).codes
    presence = sp.csr_matrix(
        (np.ones(len(structures), bool), (structures["slice_id"], codes)), shape=(len(slices), len(vocab))
    )
    attrs, _ = attribute_matrix(slice_attributes(slices), presence, vocab)
    dense = attrs.toarray()
    rng = np.random.default_rng(seed)
    cols = []
    while len(cols) < n_latents:
        a, b = rng.choice(dense.shape[1], 2, replace=False)
        mask = dense[:, a] & dense[:, b]
        if mask.sum() < 60:
            continue
        cols.append(sp.csc_matrix(np.where(mask, rng.uniform(1, 5, len(slices)), 0.0)[:, None]))
    return sp.hstack(cols, format="csr").astype(np.float32)


def build(root: Path, n_latents: int, spec: InterpretSpec) -> tuple[object, float]:
    import interp_fixtures as synthetic

    from medsae.interp.agent import AgentInputs
    from medsae.interp.stage import summarize, write_summary

    slices, structures = synthetic.make_slices(n_scans=240, slices_per_scan=24, seed=0, split="val")
    slices_dir = synthetic.write_slices_dir(root / "slices", slices, structures)
    codes = rule_codes(slices, structures, n_latents, seed=1)
    from medsae.data.index import presence_matrix

    presence, vocab = presence_matrix(slices_dir)
    t0 = time.perf_counter()
    result = summarize(slices, presence, vocab, codes, slices["slice_id"].to_numpy(), spec, "bench-sae")
    seconds = time.perf_counter() - t0
    out = root / "summarize" / "key"
    write_summary(out, result)
    return AgentInputs(out, slices_dir, "bench-sae", "key"), seconds


def server_handler():
    from llm_server import logprob_handler, peaked

    from medsae.interp.llm import rule_model

    return logprob_handler(lambda request: rule_model.handle(request["messages"], {}), peaked)


def serve(latency: float) -> None:
    """Child process: run the test server with the baseline's answers; print its URL, wait for stdin EOF."""
    from llm_server import ScriptedLLMServer

    with ScriptedLLMServer(server_handler(), latency_s=latency, max_requests=10**7, lifetime_s=7200) as server:
        print(server.url, flush=True)
        sys.stdin.read()


class ServerProcess:
    """The test server in its own process, so its Python work does not share the client's GIL."""

    def __init__(self, latency: float):
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(latency)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.url = self.proc.stdout.readline().strip()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def throughput(n_latents: int, latency: float, concurrency: int, skip_full: bool, sink: str) -> list[dict]:
    from medsae.interp.agent import Agent
    from medsae.interp.config import InterpretSpec
    from medsae.interp.journal import RegistrySink, RowSink
    from medsae.registry import Registry

    os.environ.setdefault("OPENAI_API_KEY", "sk-medsae-bench-dummy")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(latency) as server:
        root = Path(tmp)
        base = InterpretSpec(
            explainer_model="openai/bench-explainer",
            scorer_model="openai/bench-scorer",
            explainer_api_base=server.url,
            scorer_api_base=server.url,
            min_active=10,
            min_patients=3,
            concurrency=concurrency,
        )
        inputs, t_summarize = build(root, n_latents, base)
        n_slices = len(pd.read_parquet(inputs.slices_dir / "slices.parquet"))
        print(f"summarize ({n_latents} latents, {n_slices} slices): {t_summarize:.1f}s")
        settings = {"headline": {"detect": False, "ranking": False}}
        if not skip_full:
            settings["full"] = {}
        for name, extra in settings.items():
            spec = base.model_copy(update=extra)
            for run in ("first", "rerun"):
                writer = RegistrySink(Registry(root / f"registry-{name}.duckdb")) if sink == "registry" else RowSink()
                t0, c0 = time.perf_counter(), time.process_time()
                result = Agent(inputs, spec, root / "llm_cache").run(sink=writer)
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                s = result.summary
                rows.append(
                    {
                        "setting": name,
                        "run": run,
                        "latents": s["latents"],
                        "explained": s["explained"],
                        "llm_calls": s["llm_calls"],
                        "cache_hits": s["cache_hits"],
                        "failed_calls": s["failed_calls"],
                        "degenerate": s["degenerate_scores"],
                        "flushes": writer.n_flushes,
                        "seconds": round(seconds, 1),
                        "client_cpu_s": round(cpu, 1),
                        "load_avg": round(os.getloadavg()[0], 1),
                        "calls_per_s": round(s["llm_calls"] / seconds, 1),
                        "r_explanation": round(s["pearson"]["explanation"]["mean"], 3),
                        "r_shuffled": round(s["pearson"]["shuffled"]["mean"], 3),
                        "r_best_attribute": round(s["pearson"]["best_attribute"]["mean"], 3),
                    }
                )
                print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
    return rows


def demo_table(registry_path: Path, name: str, run_demo: bool) -> pd.DataFrame:
    from medsae.interp.experiment import compare
    from medsae.registry import Registry

    registry = Registry(registry_path)
    if run_demo:
        from medsae.plan import plan_experiment, run_plans
        from medsae.spec import load_specs

        t0 = time.perf_counter()
        specs = load_specs(ROOT / "experiments" / "demo.yaml")
        run_plans([plan_experiment(s) for s in specs], registry, quiet=True)
        print(f"demo run: {time.perf_counter() - t0:.0f}s")
    return compare(registry, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.2, help="server latency per call (s)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--skip-full", action="store_true", help="only the headline setting")
    parser.add_argument(
        "--sink", choices=("registry", "none"), default="registry", help="persist rows as latents finish, or not"
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--demo-registry", type=Path, default=None, help="registry holding experiment --demo")
    parser.add_argument("--demo", default="demo", help="experiment name for part 2")
    parser.add_argument("--run-demo", action="store_true", help="run experiments/demo.yaml first")
    parser.add_argument("--serve", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return

    if not args.skip_throughput:
        print(
            f"== part 1: {args.latents} latents, {args.latency * 1000:.0f} ms per call, "
            f"concurrency {args.concurrency}, sink {args.sink}"
        )
        rows = throughput(args.latents, args.latency, args.concurrency, args.skip_full, args.sink)
        print(pd.DataFrame(rows).to_string(index=False))
    if args.demo_registry or args.run_demo:
        path = args.demo_registry or Path("registry.duckdb")
        print(f"== part 2: explanation scores of experiment '{args.demo}' ({path})")
        table = demo_table(path, args.demo, args.run_demo)
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    main()

"""The default executor: every stage function runs in this process, one batch after another."""

from __future__ import annotations

import time
from collections.abc import Iterator

from medsae.executor.base import BatchDone
from medsae.stage import StageContext, StageResult
from medsae.stages import StageDef
from medsae.threads import apply_thread_limits


def run_batch(d: StageDef, ctxs: list[StageContext]) -> tuple[list[StageResult], float]:
    """Run one batch in this process: ``run_many`` for several stages, else ``run``; (results, seconds per stage)."""
    run_one, run_many = d.load(), d.load_many()
    apply_thread_limits()  # the stage's module (and torch, if it uses it) is loaded: size its pools
    t0 = time.perf_counter()
    results = run_many(ctxs) if len(ctxs) > 1 and run_many is not None else [run_one(ctxs[0])]
    return results, (time.perf_counter() - t0) / len(ctxs)


class LocalExecutor:
    """Runs each batch in the calling process (the planner hands one batch at a time)."""

    name = "local"
    concurrent = False

    def run(self, d: StageDef, batches: list[list[StageContext]]) -> Iterator[BatchDone]:
        for i, ctxs in enumerate(batches):
            results, seconds = run_batch(d, ctxs)
            yield i, results, seconds

    def close(self) -> None:
        return None

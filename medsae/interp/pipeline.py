"""Score latents one by one, many at a time, and hand each back the moment it is finished.

Each latent's work (its simulation and detection batches, the shuffled baseline's batches and the
ranking request, then the repair re-asks of its malformed batches) runs as one unit in the
gateway's event loop. ``workers`` units run at once, so the gateway's concurrency limit stays
saturated while latents keep finishing in a steady stream (a latent never waits for a global
repair round). A unit's ``finish`` step (scoring it) runs in the loop too, right after its calls,
so the calling thread does not compete with the loop for the interpreter; finished units are
yielded to the calling thread, which writes their rows: a run killed halfway keeps every latent
it finished.

One latent's unexpected failure (a bug in reading an answer) is recorded on its unit and never
stops the others; user errors (:class:`MedsaeError`: replay cache miss, rejected key) stop the run.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from medsae.errors import MedsaeError
from medsae.interp.llm import LLMRequest, LLMResponse
from medsae.interp.llm.gateway import background_loop
from medsae.interp.scorers.simulator import SimJob, Simulator, arun_jobs

_DONE = object()


@dataclass
class LatentWork:
    """The LLM work of one latent and, once run, its answers."""

    latent: int
    jobs: list[tuple[Simulator, SimJob]] = field(default_factory=list)
    extra: list[LLMRequest] = field(default_factory=list)  # e.g. the ranking request
    context: Any = None  # the caller's bookkeeping
    extra_responses: list[LLMResponse] = field(default_factory=list)
    n_repairs: int = 0
    failure: str | None = None  # an unexpected exception while running this latent
    result: Any = None  # what ``finish`` returned


Finish = Callable[[LatentWork], Any]


async def _run_one(gateway: Any, work: LatentWork, lines: dict[int, str], finish: Finish | None) -> None:
    try:
        work.extra_responses, work.n_repairs = await arun_jobs(gateway, work.jobs, lines, work.extra)
        if finish is not None:
            work.result = finish(work)
    except MedsaeError:
        raise
    except Exception as exc:  # one latent's failure never stops the others
        work.failure = f"{type(exc).__name__}: {exc}"


def run_latents(
    gateway: Any, works: Sequence[LatentWork], lines: dict[int, str], workers: int, finish: Finish | None = None
) -> Iterator[LatentWork]:
    """Run ``works`` with ``workers`` latents in flight (then ``finish(work)`` -> ``work.result``, in
    the loop); yield each as soon as it is finished."""
    if not works:
        return
    finished: queue.SimpleQueue[Any] = queue.SimpleQueue()
    pending = iter(works)

    async def worker() -> None:
        for work in pending:  # one shared iterator: each latent is taken by exactly one worker
            await _run_one(gateway, work, lines, finish)
            finished.put(work)

    async def main() -> None:
        tasks = [asyncio.ensure_future(worker()) for _ in range(max(1, min(workers, len(works))))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        finally:
            finished.put(_DONE)

    future = asyncio.run_coroutine_threadsafe(main(), background_loop())
    try:
        while True:
            item = finished.get()
            if item is _DONE:
                break
            yield item
        future.result()  # re-raise a user error from the loop
    finally:
        if not future.done():
            future.cancel()

"""What the planner asks of an executor: build batches of one stage kind and say when each is finished.

The planner (:mod:`medsae.plan`) decides what runs, prepares each stage's temporary folder, and after a
batch is finished saves its rows, renames its folder and writes the registry: an executor only runs
stage functions. A *batch* is the list of stage contexts handed to one ``run`` (or ``run_many``) call
of the stage table (:data:`medsae.stages.STAGE_TABLE`); results come back in context order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from medsae.errors import MedsaeError
from medsae.stage import StageContext, StageResult
from medsae.stages import StageDef

#: Executors by name (``medsae exp run --executor``, the spec's ``executor`` field).
EXECUTORS = ("local", "ray")

#: (batch index, its results in context order, seconds per stage of the batch)
BatchDone = tuple[int, list[StageResult], float]


class Executor(Protocol):
    """Runs the stage functions of batches of one kind."""

    name: str
    #: True: the planner hands every batch of a kind at once (they may run at the same time);
    #: False: one batch per call, each under its own locks (the local executor).
    concurrent: bool

    def run(self, d: StageDef, batches: list[list[StageContext]]) -> Iterator[BatchDone]:
        """Build ``batches`` of stage kind ``d``; yield each as soon as it is finished (any order)."""
        ...

    def close(self) -> None:
        """Release what the executor holds (a cluster connection it opened)."""
        ...


def make_executor(name: str, address: str | None = None) -> Executor:
    """The executor called ``name``; ``address`` is the Ray cluster's (None: a running or new local one)."""
    if name == "local":
        if address:
            raise MedsaeError("--address: only the ray executor connects to a cluster (use --executor ray)")
        from medsae.executor.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from medsae.executor.ray import RayExecutor

        return RayExecutor(address)
    raise MedsaeError(f"executor '{name}': unknown (executors: {', '.join(EXECUTORS)})")

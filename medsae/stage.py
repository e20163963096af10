"""The contract between the planner and each stage.

A stage is a function ``run(ctx: StageContext) -> StageResult``. It reads its upstream stages'
completed artifact folders (``ctx.inputs[kind]``), writes its own files into ``ctx.out_dir`` (a
temporary folder that the planner renames into ``artifacts/<kind>/<key>/`` only when the function
returns), and returns the rows the planner writes to the registry afterwards. Stages never write
the registry themselves, so a crash leaves neither half a folder nor half a set of rows.

Long stages keep resumable state (checkpoints, finished shards) in ``ctx.work_dir``: a folder
tied to the stage key that survives a killed run and is removed once the stage completes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("medsae")

T = TypeVar("T")


@dataclass
class Metric:
    """One row of the registry's ``metrics`` table."""

    name: str
    value: float | None
    split: str | None = None
    n: int | None = None
    target: str | None = None
    n_features: int | None = None
    extra: dict[str, Any] | None = None


@dataclass
class StageContext:
    """What a stage receives from the planner."""

    kind: str
    key: str
    params: dict[str, Any]  # the stage's resolved parameters (its spec section, as plain data)
    out_dir: Path  # write outputs here; renamed into place when the stage returns
    work_dir: Path  # resumable state; survives a crash, deleted on completion
    inputs: dict[str, Path]  # upstream kind -> completed artifact folder
    input_keys: dict[str, str]  # upstream kind -> stage key
    seed: int
    experiment: str = ""
    quiet: bool = False
    registry_path: Path | None = None

    def progress(self, iterable: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
        """Wrap an iterable in the shared progress display (rich bar, or plain log lines)."""
        from medsae.progress import track

        return track(iterable, total=total, description=description or self.kind, quiet=self.quiet)


@dataclass
class StageResult:
    """What a stage hands back to the planner for the registry."""

    metrics: list[Metric] = field(default_factory=list)
    #: registry table name -> rows (dicts, or a pyarrow.Table); ``slices_key``/``stage_key``
    #: columns are filled in by the planner when missing.
    tables: dict[str, Any] = field(default_factory=dict)
    #: small JSON-able facts shown by ``exp show`` (e.g. counts, device, images/s)
    summary: dict[str, Any] = field(default_factory=dict)
    device: str | None = None


StageFn = Callable[[StageContext], StageResult]


def metric_rows(stage_key: str, metrics: Iterable[Metric]) -> list[dict[str, Any]]:
    """Metrics as registry rows."""
    import json
    import math

    rows = []
    for m in metrics:
        value = None if m.value is None or (isinstance(m.value, float) and math.isnan(m.value)) else m.value
        row = dataclasses.asdict(m)
        row.pop("extra")
        row.update(stage_key=stage_key, value=value, extra_json=json.dumps(m.extra) if m.extra else None)
        rows.append(row)
    return rows

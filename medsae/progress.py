"""Progress for long loops: a rich bar with rate and ETA on a terminal, plain lines otherwise.

``MEDSAE_QUIET=1`` (set by ``--quiet``) silences bars and progress lines. When stderr is not a
terminal (CI, pipes) a plain line is logged at most every 10 seconds and once at the end, so
logs stay readable.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def is_quiet() -> bool:
    return os.environ.get("MEDSAE_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    os.environ["MEDSAE_QUIET"] = "1" if quiet else ""


def _interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("CI", "") == ""


def track(
    iterable: Iterable[T],
    total: int | None = None,
    description: str = "",
    quiet: bool = False,
    unit: str = "it",
) -> Iterator[T]:
    """Yield from ``iterable`` while showing progress (rate and ETA)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if quiet or is_quiet():
        yield from iterable
        return
    if _interactive():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[cyan]{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task(description, total=total, rate="")
            start = time.perf_counter()
            for i, item in enumerate(iterable, 1):
                yield item
                elapsed = max(time.perf_counter() - start, 1e-9)
                progress.update(task, advance=1, rate=f"{i / elapsed:,.1f} {unit}/s")
        return
    start = last = time.perf_counter()
    i = 0
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if now - last >= 10:
            last = now
            rate = i / (now - start)
            eta = f", ETA {(total - i) / rate:,.0f}s" if total and rate > 0 else ""
            of = f"/{total}" if total else ""
            print(f"[{description}] {i}{of} ({rate:,.1f} {unit}/s{eta})", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    if elapsed > 2:
        print(f"[{description}] {i} done in {elapsed:,.1f}s ({i / elapsed:,.1f} {unit}/s)", file=sys.stderr)

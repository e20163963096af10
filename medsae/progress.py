"""Progress for long loops: a rich bar with rate and ETA on a terminal, plain lines otherwise.

* ``track(iterable, total, description)`` wraps a loop; ``task(description, total)`` is a context
  manager yielding ``advance(n)`` for loops that are not one iterable (training steps, bytes...).
* Bars nest: a ``track`` inside another ``track`` adds a line to the same live display (rich
  allows one live display per process) and removes it when the inner loop ends.
* ``MEDSAE_QUIET=1`` (set by ``--quiet``) silences bars and progress lines.
* When stderr is not a terminal (CI, pipes, ``CI`` set) a plain line goes to stderr at most every
  ``MEDSAE_PROGRESS_INTERVAL`` seconds (default 10) and once at the end, so logs stay readable.
  ``MEDSAE_PROGRESS=rich|plain`` forces either mode.
* Everything is written to stderr, so a command's own output on stdout stays clean.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_live: Any = None  # the shared rich Progress while at least one bar is open
_depth = 0


def is_quiet() -> bool:
    return os.environ.get("MEDSAE_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    os.environ["MEDSAE_QUIET"] = "1" if quiet else ""


def _interactive() -> bool:
    forced = os.environ.get("MEDSAE_PROGRESS", "").lower()
    if forced in ("rich", "plain"):
        return forced == "rich"
    return sys.stderr.isatty() and os.environ.get("CI", "") == ""


def _interval() -> float:
    try:
        return float(os.environ.get("MEDSAE_PROGRESS_INTERVAL", "10"))
    except ValueError:
        return 10.0


def format_rate(count: float, elapsed: float, unit: str) -> str:
    """``12.3 it/s``, or ``4.5 s/it`` when slower than one per second."""
    if count <= 0 or elapsed <= 0:
        return ""
    rate = count / elapsed
    return f"{rate:,.1f} {unit}/s" if rate >= 1 else f"{1 / rate:,.1f} s/{unit}"


@contextlib.contextmanager
def _shared_progress() -> Iterator[tuple[Any, bool]]:
    """The process-wide rich Progress (created by the outermost bar); yields (progress, nested)."""
    global _live, _depth
    with _lock:
        if _live is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            _live = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("[cyan]{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            _live.start()
        _depth += 1
        progress, nested = _live, _depth > 1
    try:
        yield progress, nested
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _live.stop()
                _live = None


@contextlib.contextmanager
def task(
    description: str = "", total: int | None = None, unit: str = "it", quiet: bool = False
) -> Iterator[Callable[[float], None]]:
    """Show progress of a unit of work; yields ``advance(n=1)`` to call as work gets done."""
    if quiet or is_quiet():
        yield lambda n=1: None
        return
    start = time.perf_counter()
    done = 0.0
    if _interactive():
        with _shared_progress() as (progress, nested):
            task_id = progress.add_task(description, total=total, rate="")

            def advance(n: float = 1) -> None:
                nonlocal done
                done += n
                progress.update(task_id, advance=n, rate=format_rate(done, time.perf_counter() - start, unit))

            try:
                yield advance
            finally:
                if nested:
                    progress.remove_task(task_id)
        return

    interval = _interval()
    last = start

    def advance_plain(n: float = 1) -> None:
        nonlocal done, last
        done += n
        now = time.perf_counter()
        if now - last >= interval:
            last = now
            rate = done / max(now - start, 1e-9)
            eta = f", ETA {(total - done) / rate:,.0f}s" if total and rate > 0 else ""
            of = f"/{total}" if total else ""
            print(
                f"[{description}] {done:,.0f}{of} ({format_rate(done, now - start, unit)}{eta})",
                file=sys.stderr,
                flush=True,
            )

    try:
        yield advance_plain
    finally:
        elapsed = time.perf_counter() - start
        if elapsed > 2 or interval <= 0:
            print(
                f"[{description}] {done:,.0f} done in {elapsed:,.1f}s ({format_rate(done, elapsed, unit)})",
                file=sys.stderr,
                flush=True,
            )


def track(
    iterable: Iterable[T],
    total: int | None = None,
    description: str = "",
    quiet: bool = False,
    unit: str = "it",
) -> Iterator[T]:
    """Yield from ``iterable`` while showing progress (rate and ETA)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if quiet or is_quiet():
        yield from iterable
        return
    with task(description, total=total, unit=unit) as advance:
        for item in iterable:
            yield item
            advance(1)

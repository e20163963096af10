"""The contract between the planner and each stage.

A stage is a function ``run(ctx: StageContext) -> StageResult``. It reads its upstream stages'
completed artifact folders (``ctx.inputs[kind]``), writes its own files into ``ctx.out_dir`` (a
temporary folder that the planner renames into ``artifacts/<kind>/<key>/`` only when the function
returns), and returns the rows the planner writes to the registry afterwards. Stages never write
the registry themselves, so a crash leaves neither half a folder nor half a set of rows.

Long stages keep resumable state (checkpoints, finished shards) in ``ctx.work_dir``: a folder
tied to the stage key that survives a killed run and is removed once the stage completes.

The file-system helpers at the end are shared by the planner and the stages: an inter-process
lock (two runs of one spec build each stage once), a write probe run before any work, and the
umask-respecting file mode for outputs written by libraries that create private files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from medsae.errors import MedsaeError
from medsae.specbase import Section

log = logging.getLogger("medsae")

T = TypeVar("T")
S = TypeVar("S", bound=Section)


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
    """What a stage receives from the planner.

    ``spec`` is the stage's typed spec section (a pydantic :class:`~medsae.specbase.Section`, e.g.
    ``SAESpec``; None for a stage without one, e.g. encode); stages read it through :meth:`section`.
    """

    kind: str
    key: str
    out_dir: Path  # write outputs here; renamed into place when the stage returns
    work_dir: Path  # resumable state; survives a crash, deleted on completion
    inputs: dict[str, Path]  # upstream kind -> completed artifact folder
    input_keys: dict[str, str]  # upstream kind -> stage key
    seed: int
    experiment: str = ""
    quiet: bool = False
    registry_path: Path | None = None
    spec: Section | None = None  # the stage's typed spec section (what stages read)

    def section(self, cls: type[S]) -> S:
        """The stage's spec section as ``cls``; a one-line error if the context holds another kind or none."""
        spec = self.spec
        if spec is None:
            raise MedsaeError(f"stage {self.kind}: expected the {cls.__name__} section, got none")
        if not isinstance(spec, cls):
            raise MedsaeError(f"stage {self.kind}: expected the {cls.__name__} section, got {type(spec).__name__}")
        return spec

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


def as_section(cls: type[S], value: S | Mapping[str, Any]) -> S:
    """``value`` as the spec section ``cls``: a section passes through, plain data is validated.

    For library entry points that callers outside the planner feed with plain data (JSON files,
    scripts); everything inside medsae hands sections around.
    """
    return value if isinstance(value, cls) else cls.model_validate(dict(value))


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


# -- file-system helpers shared by the planner and the stages -------------------------------------

LOCK_TIMEOUT_ENV = "MEDSAE_LOCK_TIMEOUT"
#: A waiting process gives up after this many seconds (a day: a stage of the full study can take hours;
#: a crashed holder releases its lock at once, so the timeout only guards against a hung one).
DEFAULT_LOCK_TIMEOUT = 86400.0


class LockTimeoutError(MedsaeError):
    """Another process held a stage or dataset lock for longer than we wait."""


def lock_timeout() -> float:
    """Seconds to wait for a stage or dataset lock (``MEDSAE_LOCK_TIMEOUT``, default one day)."""
    text = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise MedsaeError(f"{LOCK_TIMEOUT_ENV}={text!r}: expected a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise MedsaeError(f"{LOCK_TIMEOUT_ENV}={text!r}: expected a finite number of seconds >= 0")
    return value


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the inter-process lock ``lock_path`` for the body; waits at most :func:`lock_timeout`.

    The lock is an OS file lock (``filelock``): the kernel releases it when the holder exits,
    even on ``kill -9``, so there is never a stale lock to clean up. ``on_wait`` is called once
    when another process holds the lock and we start waiting.
    """
    import filelock

    timeout = lock_timeout()
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if on_wait is not None:
            on_wait()
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise LockTimeoutError(
                f"{lock_path}: {what} is still being built by another medsae process after {timeout:.0f}s "
                f"(set {LOCK_TIMEOUT_ENV} to wait longer)"
            ) from None
    try:
        yield
    finally:
        lock.release()


def _reason(exc: OSError) -> str:
    text = os.strerror(exc.errno) if exc.errno else str(exc)
    return text[:1].lower() + text[1:]


def _folder_problem(folder: Path) -> tuple[Path, str] | None:
    """(offending path, problem) if no file can be created in ``folder`` (created on demand), else None."""
    probe = folder
    while not os.path.exists(probe):
        if os.path.lexists(probe):
            return probe, "is a dangling symlink"
        probe = probe.parent
    if not probe.is_dir():
        return probe, "is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".medsae-probe-", dir=probe)
    except OSError as exc:
        return probe, f"is not writable ({_reason(exc)})"
    os.close(fd)
    os.unlink(name)
    return None


def check_writable_folder(path: str | Path, what: str) -> Path:
    """Raise a one-line :class:`MedsaeError` unless ``path`` is, or can be created as, a writable folder.

    Probes by creating and removing a temporary file, so permissions, read-only mounts and
    root-squashed shares are all caught before any work starts. A folder that does not exist
    yet is not created: its nearest existing parent is probed instead. Returns ``path``.
    """
    target = Path(os.path.abspath(Path(path).expanduser()))
    problem = _folder_problem(target)
    if problem is not None:
        where, text = problem
        if where == target:
            raise MedsaeError(f"{target}: {what} {text}")
        raise MedsaeError(f"{target}: cannot create {what}: {where} {text}")
    return Path(path)


def check_writable_file(path: str | Path, what: str) -> Path:
    """Raise a one-line :class:`MedsaeError` unless the file ``path`` can be created or replaced."""
    target = Path(os.path.abspath(Path(path).expanduser()))
    if os.path.isdir(target):
        raise MedsaeError(f"{target}: cannot write {what}: it is a folder")
    problem = _folder_problem(target.parent)
    if problem is not None:
        where, text = problem
        raise MedsaeError(f"{target}: cannot write {what}: {where} {text}")
    if os.path.exists(target):
        try:
            os.close(os.open(target, os.O_WRONLY))
        except OSError as exc:
            raise MedsaeError(f"{target}: {what} is not writable ({_reason(exc)})") from None
    return Path(path)


def umask_mode(executable: bool = False) -> int:
    """The mode a plain ``open(..., 'w')`` would give a new file: 0666 (0777) minus the umask."""
    return (0o777 if executable else 0o666) & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (``os.umask`` is racy)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_shareable(path: str | Path, executable: bool = False) -> None:
    """Give a file the umask-respecting mode (libraries such as safetensors write 0600 files)."""
    try:
        os.chmod(path, umask_mode(executable))
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EACCES):
            raise


def make_tree_shareable(folder: str | Path) -> None:
    """:func:`make_shareable` for every file and folder below ``folder`` (and ``folder`` itself)."""
    make_shareable(folder, executable=True)
    for base, dirs, files in os.walk(folder):
        for name in dirs:
            make_shareable(os.path.join(base, name), executable=True)
        for name in files:
            make_shareable(os.path.join(base, name))

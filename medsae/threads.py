"""How many CPUs medsae may use, and sizing every thread pool to that.

On a shared node the machine's core count says little: a batch scheduler or container confines a job
with a CPU affinity mask (``taskset``, Slurm's cpusets) or a CFS quota (``docker --cpus``, Kubernetes
limits, cgroup ``cpu.max``). torch follows the affinity mask but not the quota, so in a 2-CPU container
on a 64-core host it starts 64 threads that the kernel throttles in turn; and two compute threads per
busy CPU make each torch op wait at its barriers (the demo's train stage ran 130x slower under load).

The count is ``MEDSAE_THREADS`` when set, else ``OMP_NUM_THREADS`` when set (what HPC job scripts use),
else the affinity mask capped by the cgroup quota. A fractional quota is rounded down (1.5 CPUs ->
1 thread, never below 1): a thread more than the quota pays for is throttled each period, which costs
more than the spare half CPU gives.

:func:`apply_thread_limits` runs at CLI start (before torch is imported: only environment variables,
which torch, MKL and OpenBLAS read at import and subprocesses inherit) and again in the stage runner
once a stage's module is loaded (then torch's own pools are sized too).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from medsae.errors import MedsaeError

THREADS_ENV = "MEDSAE_THREADS"
#: thread-count variables of the libraries under torch and numpy; subprocess workers inherit them
LIBRARY_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
MAX_THREADS = 4096
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (the machine's count where the OS has no masks)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _v2_limit(folder: Path) -> float | None:
    """CPUs allowed by ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``) in ``folder``."""
    text = _read(folder / "cpu.max")
    parts = text.split() if text else []
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(folder: Path) -> float | None:
    """CPUs allowed by ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in ``folder`` (quota -1: none)."""
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _own_groups(proc_cgroup: Path) -> dict[str, str]:
    """This process's cgroup path per hierarchy: ``""`` for v2, each v1 controller name for v1."""
    groups: dict[str, str] = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            groups[""] = path
        for name in controllers.split(","):
            groups[name] = path
    return groups


def _folders(mount: Path, own: str | None) -> list[Path]:
    """The cgroup folders whose limits apply: our own and each parent up to the mount (inside a
    container the recorded path may not exist under the mount: then the mount itself is ours)."""
    folders = [mount]
    if own and own != "/":
        here = mount / own.lstrip("/")
        while here != mount and mount in here.parents:
            if here.is_dir():
                folders.append(here)
            here = here.parent
    return folders


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs the cgroup CPU quota allows this process (the tightest of v2 and v1, own group and
    parents); None when no quota applies or no cgroup file system is mounted."""
    groups = _own_groups(proc_cgroup)
    limits: list[float] = []
    for mount in (root, root / "unified"):  # v2 alone, or v2 beside v1 (hybrid)
        if (mount / "cgroup.controllers").is_file():
            limits += [x for f in _folders(mount, groups.get("")) if (x := _v2_limit(f)) is not None]
    for name in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
        mount = root / name
        if mount.is_dir():
            limits += [x for f in _folders(mount, groups.get("cpu")) if (x := _v1_limit(f)) is not None]
            break
    return min(limits) if limits else None


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs this process may use: its affinity mask capped by the cgroup quota (rounded down), >= 1."""
    cpus = affinity_cpus()
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return cpus


def _parse(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_THREADS:
        raise MedsaeError(f"{name}={text!r}: expected a whole number of threads from 1 to {MAX_THREADS}, or 'auto'")
    return value


def requested_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """``MEDSAE_THREADS`` as a number; None when unset, empty or ``auto``; a one-line error when invalid."""
    text = (os.environ if environ is None else environ).get(THREADS_ENV, "").strip()
    if text.lower() in ("", "auto"):
        return None
    return _parse(THREADS_ENV, text)


def thread_count(environ: Mapping[str, str] | None = None) -> int:
    """Threads medsae's compute uses: ``MEDSAE_THREADS``, else ``OMP_NUM_THREADS``, else :func:`available_cpus`."""
    env = os.environ if environ is None else environ
    requested = requested_threads(env)
    if requested is not None:
        return requested
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:  # a list like "4,2" (nested OpenMP) is left to OpenMP
        return min(int(omp), MAX_THREADS)
    return available_cpus()


def worker_count(requested: int) -> int:
    """Worker processes to start when ``requested`` were asked for: at most ``MEDSAE_THREADS``, else at
    most :func:`available_cpus` (``OMP_NUM_THREADS`` counts threads per process, not processes)."""
    return max(1, min(requested, requested_threads() or available_cpus()))


def limit_torch_threads(n: int, *, exact: bool = False) -> None:
    """Size torch's CPU pools to ``n`` if torch is imported (never imports it).

    Without ``exact`` only lowers the count: a caller who set fewer threads (a test, a script) keeps them.
    """
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "set_num_threads"):
        return
    if exact or torch.get_num_threads() > n:
        torch.set_num_threads(n)
    if torch.get_num_interop_threads() > n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # settable once, before any inter-op work: too late here, leave it
            pass


def apply_thread_limits() -> int:
    """Size the thread pools of this process and its subprocesses to :func:`thread_count`; returns it.

    Sets the libraries' variables (``OMP_NUM_THREADS``...) where the user did not (``MEDSAE_THREADS``
    overrides them), then torch's pools if torch is already imported.
    """
    requested = requested_threads()
    n = thread_count()
    for var in LIBRARY_ENV:
        if requested is not None or not os.environ.get(var, "").strip():
            os.environ[var] = str(n)
    limit_torch_threads(n, exact=requested is not None)
    return n


__all__ = [
    "THREADS_ENV",
    "affinity_cpus",
    "apply_thread_limits",
    "available_cpus",
    "cgroup_cpu_limit",
    "limit_torch_threads",
    "requested_threads",
    "thread_count",
    "worker_count",
]

"""CPU sizing: affinity, cgroup v1/v2 quotas read from files, the MEDSAE_THREADS override, and torch's
pool in a real subprocess (under ``taskset`` and under the override)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medsae import threads
from medsae.errors import MedsaeError

REPO = Path(__file__).resolve().parents[1]


def _v2(tmp_path: Path, cpu_max: str, own: str = "/") -> tuple[Path, Path]:
    """A cgroup v2 tree with ``cpu.max`` in the group ``own``; returns (root, /proc/self/cgroup file)."""
    root = tmp_path / "cg"
    group = root / own.lstrip("/")
    group.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (group / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def _v1(tmp_path: Path, quota: int, period: int, dirname: str = "cpu,cpuacct") -> tuple[Path, Path]:
    root = tmp_path / "cg1"
    group = root / dirname
    group.mkdir(parents=True)
    (group / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (group / "cpu.cfs_period_us").write_text(f"{period}\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:memory:/x\n3:cpu,cpuacct:/\n")
    return root, proc


def test_cgroup_v2_quota_and_none(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path, "150000 100000")
    assert threads.cgroup_cpu_limit(root, proc) == pytest.approx(1.5)
    (root / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(root, proc) is None
    (root / "cpu.max").write_text("garbage\n")
    assert threads.cgroup_cpu_limit(root, proc) is None


def test_cgroup_v2_tightest_of_own_group_and_parents(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path, "400000 100000", own="/job/step")
    (root / "job" / "cpu.max").write_text("250000 100000\n")  # the parent is tighter
    assert threads.cgroup_cpu_limit(root, proc) == pytest.approx(2.5)


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    root, proc = _v1(tmp_path, 300000, 100000)
    assert threads.cgroup_cpu_limit(root, proc) == pytest.approx(3.0)
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no quota"
    assert threads.cgroup_cpu_limit(root, proc) is None


def test_no_cgroup_mounted(tmp_path: Path) -> None:
    assert threads.cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent_proc") is None


@pytest.mark.parametrize(("quota", "expected"), [(150000, 1), (50000, 1), (250000, 2), (10_000_000, None)])
def test_quota_rounds_down_capped_by_affinity(tmp_path: Path, quota: int, expected: int | None) -> None:
    """1.5 CPUs -> 1 thread, 0.5 -> 1 (never 0), 2.5 -> 2; a quota above the affinity mask changes nothing."""
    root, proc = _v2(tmp_path, f"{quota} 100000")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    want = affinity if expected is None else min(expected, affinity)
    assert threads.available_cpus(root, proc) == want


def test_affinity_smaller_than_core_count(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this OS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    assert threads.affinity_cpus() == 1
    assert threads.worker_count(8) == 1


def test_override_and_precedence() -> None:
    assert threads.thread_count({"MEDSAE_THREADS": "3", "OMP_NUM_THREADS": "7"}) == 3
    assert threads.thread_count({"MEDSAE_THREADS": " auto ", "OMP_NUM_THREADS": "7"}) == 7
    assert threads.thread_count({"OMP_NUM_THREADS": "4,2"}) == threads.available_cpus()
    assert threads.thread_count({}) == threads.available_cpus()


@pytest.mark.parametrize("text", ["0", "-2", "two", "1.5", "99999"])
def test_invalid_override_is_one_line(text: str) -> None:
    with pytest.raises(MedsaeError) as info:
        threads.thread_count({"MEDSAE_THREADS": text})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"MEDSAE_THREADS={text!r}:")


def test_worker_count_follows_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSAE_THREADS", "3")
    assert [threads.worker_count(n) for n in (1, 3, 8)] == [1, 3, 3]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # threads per process: does not cap processes
    monkeypatch.delenv("MEDSAE_THREADS")
    assert threads.worker_count(64) == threads.available_cpus()


def _torch_threads(env_extra: dict[str, str], prefix: list[str] | None = None) -> tuple[int, int]:
    """(medsae's count, torch's threads) in a fresh interpreter that runs the CLI's thread setup."""
    code = (
        "from medsae.threads import apply_thread_limits; n = apply_thread_limits(); "
        "import torch; print(n, torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in (*threads.LIBRARY_ENV, threads.THREADS_ENV)}
    env.update(env_extra)
    out = subprocess.run(
        [*(prefix or []), sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    n, torch_n = out.stdout.split()
    return int(n), int(torch_n)


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset not installed")
def test_torch_follows_affinity_under_taskset() -> None:
    assert _torch_threads({}, ["taskset", "-c", "0"]) == (1, 1)


def test_torch_follows_override_in_subprocess() -> None:
    """MEDSAE_THREADS=1 gives torch 1 thread where it would otherwise take every CPU."""
    assert _torch_threads({"MEDSAE_THREADS": "1"}) == (1, 1)


def test_cli_reports_invalid_override_in_one_line() -> None:
    env = {**os.environ, "MEDSAE_THREADS": "lots"}
    out = subprocess.run(
        [sys.executable, "-m", "medsae.cli.main", "--help"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MEDSAE_THREADS='lots': expected a whole number")

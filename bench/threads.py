"""The demo's SAE training on a quiet machine and beside a competing CPU load, by thread sizing.

    .venv/bin/python bench/threads.py                 # 3 interleaved rounds, 4 busy-loop processes
    .venv/bin/python bench/threads.py --rounds 1 --load 8

Each cell trains the demo spec's ``sae:`` section (TopK, 96 latents, k = 16, AuxK, batch 256,
30 epochs) on 618 x 1280 float32 rows (the demo's train split of EfficientNet-Lite0 features; the
values are synthetic, the work is the same) in a fresh interpreter, timing ``train_many`` only:

* **torch default**: no thread setup; torch starts one thread per CPU of the affinity mask (it
  ignores cgroup quotas);
* **medsae auto**: :func:`medsae.threads.apply_thread_limits` as at CLI start: the affinity mask
  capped by the cgroup quota (``MEDSAE_THREADS`` unset);
* **MEDSAE_THREADS=1**: the override.

The competing load is ``--load`` Python busy loops (``while True: pass``), started before a round's
cells and stopped after them. Rounds interleave all cells, so drifts of a shared machine hit every
cell alike; the table shows medians. On a machine without a CPU quota "medsae auto" equals the
affinity count, i.e. torch's default: the override is what helps there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"torch default": {}, "medsae auto": {}, "MEDSAE_THREADS=1": {"MEDSAE_THREADS": "1"}}
CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "MEDSAE_THREADS")


def child(mode: str, epochs: int) -> None:
    """Train the demo's SAE once in this process; print JSON {seconds, torch threads}."""
    if mode != "torch default":
        from medsae.threads import apply_thread_limits

        apply_thread_limits()
    import numpy as np
    import torch
    import yaml

    from medsae.sae.config import SAESpec
    from medsae.sae.data import ArrayStore, TrainData
    from medsae.sae.train import TrainJob, train_many

    section = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text())["sae"]
    spec = SAESpec.model_validate({**section, "epochs": epochs, "log_every": 10**6})
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(618, 1280)), 0).astype(np.float32)  # ReLU-like pooled features
    device = torch.device("cpu")
    data = TrainData(ArrayStore(x), np.arange(len(x)), device, 1e12)
    t0 = time.perf_counter()
    train_many([TrainJob(spec.model_dump(mode="json"))], data, device)
    print(json.dumps({"seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}))


def run_cell(mode: str, epochs: int, timeout: float) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(MODES[mode], MEDSAE_QUIET="1")
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--epochs", str(epochs)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise SystemExit(f"{mode}: {out.stderr.strip().splitlines()[-1:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return float(got["seconds"]), int(got["threads"])


def start_load(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--load", type=int, default=4, help="busy-loop processes of the competing load")
    ap.add_argument("--epochs", type=int, default=30, help="the demo trains 30")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one cell may take")
    ap.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.epochs)
        return

    from medsae.threads import affinity_cpus, available_cpus, cgroup_cpu_limit

    quota = cgroup_cpu_limit()
    print(
        f"cpus: os.cpu_count {os.cpu_count()}, affinity {affinity_cpus()}, cgroup quota "
        f"{'none' if quota is None else f'{quota:g}'}, medsae auto {available_cpus()}; "
        f"load average before {os.getloadavg()[0]:.1f}"
    )
    loads = {"quiet": 0, f"{args.load} busy loops": args.load}
    times: dict[tuple[str, str], list[float]] = {}
    threads: dict[str, int] = {}
    for _ in range(args.rounds):
        for load_name, n in loads.items():
            procs = start_load(n)
            try:
                time.sleep(0.5 if n else 0)
                for mode in MODES:
                    seconds, threads[mode] = run_cell(mode, args.epochs, args.timeout)
                    print(f"  {load_name}, {mode}: {seconds:.2f} s", file=sys.stderr, flush=True)
                    times.setdefault((load_name, mode), []).append(seconds)
            finally:
                stop_load(procs)

    base = statistics.median(times[("quiet", "torch default")])
    print(f"\ndemo SAE training ({args.epochs} epochs), median of {args.rounds} interleaved rounds, seconds")
    header = f"{'threads sizing':<18} {'torch threads':>13} " + " ".join(f"{name:>16}" for name in loads)
    print(header + f" {'slowdown under load':>20}")
    for mode in MODES:
        cells = [statistics.median(times[(name, mode)]) for name in loads]
        print(
            f"{mode:<18} {threads[mode]:>13} "
            + " ".join(f"{c:>16.2f}" for c in cells)
            + f" {cells[-1] / cells[0]:>19.1f}x"
        )
    print(f"(quiet torch default = {base:.2f} s)")


if __name__ == "__main__":
    main()

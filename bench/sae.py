"""SAE training throughput: a study-style loop vs medsae's trainer, one pass for 8 configs vs 8 runs.

    .venv/bin/python bench/sae.py                    # d=1024, 8192 latents, k=10, batch 4096, CPU
    .venv/bin/python bench/sae.py --device cuda      # on a GPU (bf16 encoder matmul, as the study)
    .venv/bin/python bench/sae.py --quick            # smaller shapes, a few seconds

Rows of the table:

* **matmul**: a plain ``x @ W_encᵀ`` of the step's shape ([B, d] x [d, D]), GFLOP/s. The work a
  TopK step cannot avoid is the encoder forward and the encoder weight gradient (two such matmuls
  when done densely) plus a sparse decoder (``6·B·k·d`` FLOPs), so the *ceiling* is
  ``matmul GFLOP/s / (4·d·D + 6·k·d)`` samples/s.
* **study-style loop**: the study's per-step work without Lightning: TopK on a dense
  ``z = (x - b_dec) W_encᵀ + b_enc``, codes scattered into a dense [B, D] matrix, dense decoder
  (tied, read detached, as the study), autograd through everything (which also computes the full
  input gradient to update b_dec), Adam, grad-norm clip.
* **medsae**: :func:`medsae.sae.train.train_many` with one TopK config (sparse decoder through
  ``embedding_bag``, encoder gradients scattered only at the selected entries, b_dec's encoder
  gradient as one vector-matrix product); with and without AuxK.
* **8 configs**: eight TopK configs (k = 4..32) trained in one pass vs one after the other.

"GFLOP/s" counts the unavoidable work above at its dense cost (4·d·D + 6·k·d per sample) divided
by the measured step time; "%" = that / the matmul GFLOP/s, where every step is paired with a
matmul timed right after it (medians over the steps), so a loaded, shared machine affects both alike. medsae computes
the encoder weight gradient sparsely (only the k selected entries per sample contribute), so it
can exceed 100 %.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

os.environ.setdefault("MEDSAE_QUIET", "1")

from medsae.sae.config import SAESpec
from medsae.sae.data import ArrayStore, TrainData
from medsae.sae.train import TrainJob, compute_dtype, resolve_device, train_many


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class MatmulClock:
    """Times one plain ``x @ W_encᵀ`` of the step's shape ([B, d] x [d, D]) on demand."""

    def __init__(self, b: int, d: int, n: int, device: torch.device, dtype: torch.dtype):
        self.x = torch.randn(b, d, device=device).to(dtype)
        self.w = torch.randn(n, d, device=device).to(dtype)
        self.device, self.flops = device, 2 * b * d * n
        self()

    def __call__(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self.x @ self.w.t()
        _sync(self.device)
        return time.perf_counter() - t0


def study_loop(x: torch.Tensor, n_lat: int, k: int, batch: int, steps: int, dtype: torch.dtype, clock) -> list:
    """(step seconds, matmul seconds) pairs of the study-style step (dense everything, autograd)."""
    device = x.device
    d = x.shape[1]
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(n_lat, d, generator=gen) * 2 - 1
    w = (w / w.norm(dim=1, keepdim=True)).to(device).requires_grad_()
    b_enc = torch.zeros(n_lat, device=device, requires_grad=True)
    b_dec = torch.zeros(d, device=device, requires_grad=True)
    params = [w, b_enc, b_dec]
    opt = torch.optim.Adam(params, lr=1e-4)
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(xb: torch.Tensor) -> None:
        xb = xb / xb.norm(dim=1, keepdim=True)
        with torch.autocast(**autocast):
            z = (xb - b_dec) @ w.t() + b_enc
        vals, idx = torch.topk(z.float(), k, dim=1)
        codes = torch.zeros(xb.shape[0], n_lat, device=device).scatter(1, idx, vals)
        with torch.autocast(**autocast):
            x_hat = codes @ w.detach() + b_dec
        loss = ((x_hat.float() - xb) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()

    step(x[:batch])  # warm-up
    pairs = []
    for s in range(steps):
        start = (s * batch) % max(x.shape[0] - batch + 1, 1)
        _sync(device)
        t0 = time.perf_counter()
        step(x[start : start + batch])
        _sync(device)
        pairs.append((time.perf_counter() - t0, clock()))
    return pairs


def medsae_pass(x: np.ndarray, device: torch.device, specs: list[SAESpec], clock=None, warmup: int = 1) -> dict:
    """One train_many pass. With ``clock``, a matmul is timed after every step (outside the step's time)."""
    wall0 = time.perf_counter()
    data = TrainData(ArrayStore(x), np.arange(len(x)), device, 1e12)
    marks: list[tuple[float, float]] = []  # (time the step ended, matmul seconds measured after it)

    def on_step(step: int) -> None:
        _sync(device)
        end = time.perf_counter()
        marks.append((end, clock() if clock else 0.0))

    results = train_many([TrainJob(s.model_dump(mode="json")) for s in specs], data, device, on_step=on_step)
    _sync(device)
    # a step's time = from the end of the previous callback (its matmul included) to its own end
    pairs = [(marks[i][0] - marks[i - 1][0] - marks[i - 1][1], marks[i][1]) for i in range(warmup, len(marks))]
    return {
        "pairs": pairs,
        "seconds": sum(p[0] for p in pairs),
        "steps": len(pairs),
        "wall": time.perf_counter() - wall0,
        "dead": results[0].log[-1]["dead_fraction"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--latents", type=int, default=8192)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--quick", action="store_true", help="d=256, 2048 latents, batch 1024")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.d, args.latents, args.batch = 256, 2048, 1024
    device = resolve_device(args.device)
    dtype = compute_dtype("auto", device)
    d, n_lat, k, batch, steps = args.d, args.latents, args.k, args.batch, args.steps
    if device.type == "cuda":
        steps *= 20
    rng = np.random.default_rng(0)
    x_np = (rng.normal(size=(batch * (steps + 2), d)) + 0.5).astype(np.float32)
    work = 4 * d * n_lat + 6 * k * d  # FLOPs per sample a TopK step cannot avoid (dense-equivalent)
    clock = MatmulClock(batch, d, n_lat, device, dtype)

    def spec(k_: int = k, auxk: bool = False, precision: str = "auto") -> SAESpec:
        return SAESpec(
            arch="topk",
            d_sae=n_lat,
            k=k_,
            batch_size=batch,
            epochs=1,
            auxk=auxk,
            b_dec_init="zeros",
            lr=1e-4,
            grad_clip=0.5,
            dead_after=batch,
            log_every=10**6,
            precision=precision,
        )

    # Each step is followed by one timed plain matmul, so every step is compared with the matmul
    # speed of its own moment (on a shared machine the speed moves by 2x within minutes).
    rows: list[tuple[str, list]] = []
    x_dev = torch.from_numpy(x_np).to(device)
    rows.append(("study-style loop (dense decoder, autograd)", study_loop(x_dev, n_lat, k, batch, steps, dtype, clock)))
    rows.append(("medsae trainer, TopK", medsae_pass(x_np, device, [spec()], clock)["pairs"]))
    aux = medsae_pass(x_np, device, [spec(auxk=True)], clock, warmup=2)
    rows.append(("medsae trainer, TopK + AuxK", aux["pairs"]))
    if device.type == "cpu":
        rows.append(
            ("medsae, TopK, bf16 encoder matmul", medsae_pass(x_np, device, [spec(precision="bf16")], clock)["pairs"])
        )

    print(
        f"\nSAE training on {device} ({str(dtype).replace('torch.', '')} encoder matmul), d={d}, "
        f"latents={n_lat}, k={k}, batch={batch}, threads={torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"unavoidable work of a TopK step (dense-equivalent): {work / 1e6:.1f} MFLOP/sample; ceiling = matmul "
        "speed / that work; medians over steps, each step paired with a matmul timed right after it\n"
    )
    print(f"{'trainer':44s} {'samples/s':>10s} {'GFLOP/s':>8s} {'matmul':>8s} {'ceiling':>8s} {'%':>5s}")
    for name, pairs in rows:
        step_s = float(np.median([p[0] for p in pairs]))
        mm_s = float(np.median([p[1] for p in pairs]))
        ratio = float(np.median([(p[1] * work / (2 * d * n_lat)) / p[0] for p in pairs]))
        rate, gflops = batch / step_s, clock.flops / mm_s / 1e9
        print(
            f"{name:44s} {rate:10,.0f} {rate * work / 1e9:8,.1f} {gflops:8,.1f} "
            f"{gflops * 1e9 / work:8,.0f} {100 * ratio:4.0f}%"
        )
    print(f"(AuxK row: dead after {batch} samples without firing; {100 * aux['dead']:.0f} % dead at the end)")
    if device.type == "cpu":
        print("(bf16 row: the CPU's bf16 matmul, compared with the fp32 ceiling; CPU runs default to fp32)")

    ks = [4, 6, 8, 10, 12, 16, 24, 32]
    multi_steps = max(2, steps // 2)
    x_small = x_np[: batch * (multi_steps + 1)]
    one = medsae_pass(x_small, device, [spec(k_) for k_ in ks])
    seq = [medsae_pass(x_small, device, [spec(k_)]) for k_ in ks]
    t_seq, wall_seq = sum(r["seconds"] for r in seq), sum(r["wall"] for r in seq)
    print(
        f"\n8 TopK configs (k = {ks}), {one['steps']} timed steps each; wall includes data setup and the "
        "final statistics pass"
    )
    print(f"{'':24s} {'timed steps':>12s} {'wall':>9s}")
    print(f"{'one pass, 8 configs':24s} {one['seconds']:11.2f}s {one['wall']:8.2f}s")
    print(f"{'8 sequential runs':24s} {t_seq:11.2f}s {wall_seq:8.2f}s")
    ratio, wall_ratio = 100 * one["seconds"] / t_seq, 100 * one["wall"] / wall_seq
    print(f"{'one pass / sequential':24s} {ratio:11.0f}% {wall_ratio:8.0f}%")


if __name__ == "__main__":
    main()

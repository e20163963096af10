"""SAE training throughput: a study-style loop vs medsae's trainer, one pass for 8 configs vs 8 runs.

    .venv/bin/python bench/sae.py                    # d=1024, 8192 latents, k=10, batch 4096, CPU
    .venv/bin/python bench/sae.py --device cuda      # on a GPU (bf16 encoder matmul, as the study)
    .venv/bin/python bench/sae.py --quick            # smaller shapes, a few seconds
    /tmp/benchvenv/bin/python bench/sae.py --peers   # medsae fp32 / bf16-mixed beside sparsify and SAELens

``--peers`` needs EleutherAI's sparsify and SAELens, optional extras of this bench (not of medsae),
installed into a SEPARATE environment, never into the project's .venv::

    python3 -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install -e . -r bench/requirements-peers.txt

A peer that is not installed is left out of the table (and said so). Peer rows: every trainer
starts from medsae's initial weights (copied into the peer's modules), trains the same steps on
the same planted data (each sample a sum of k of ``latents`` random unit atoms), and the trainers
take turns in interleaved rounds; "ratio" is the median over rounds of medsae's samples/s over the
fastest peer's in the same round (a loaded machine slows every trainer of a round alike), and FVU
is each trainer's own reconstruction of held-out planted samples after those steps.

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
import sys
import time

import numpy as np
import torch

os.environ.setdefault("MEDSAE_QUIET", "1")

from typing import Any

from medsae.sae.config import SAESpec
from medsae.sae.data import ArrayStore, TrainData
from medsae.sae.models import SAE, SAEConfig
from medsae.sae.precision import bf16_support
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


def medsae_pass(
    x: np.ndarray, device: torch.device, specs: list[SAESpec], clock=None, warmup: int = 1, batched: bool | None = None
) -> dict:
    """One train_many pass. With ``clock``, a matmul is timed after every step (outside the step's time)."""
    wall0 = time.perf_counter()
    data = TrainData(ArrayStore(x), np.arange(len(x)), device, 1e12)
    marks: list[tuple[float, float]] = []  # (time the step ended, matmul seconds measured after it)

    def on_step(step: int) -> None:
        _sync(device)
        end = time.perf_counter()
        marks.append((end, clock() if clock else 0.0))

    jobs = [TrainJob(s.model_dump(mode="json")) for s in specs]
    results = train_many(jobs, data, device, on_step=on_step, batched=batched)
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


def planted(n: int, d: int, n_atoms: int, k: int, seed: int = 0) -> np.ndarray:
    """n samples, each a sum of k of ``n_atoms`` random unit atoms with coefficients in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = rng.integers(0, n_atoms, size=(n, k))
    coef = rng.uniform(0.5, 1.5, size=(n, k, 1)).astype(np.float32)
    return (coef * atoms[idx]).sum(1)


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def _peer_loop(step, x: torch.Tensor, batch: int, steps: int, device: torch.device) -> float:
    """Seconds of ``steps`` calls of ``step(batch)`` after one warm-up step (not timed)."""
    step(x[:batch])
    _sync(device)
    t0 = time.perf_counter()
    for s in range(steps):
        step(x[(s + 1) * batch : (s + 2) * batch])
    _sync(device)
    return time.perf_counter() - t0


def run_sparsify(init: dict, x: torch.Tensor, held: torch.Tensor, k: int, batch: int, steps: int, lr: float):
    """EleutherAI sparsify's SparseCoder (its fused TopK encoder), Adam, unit-norm decoder as its trainer does.

    Off CUDA, sparsify's own eager decoder (its Triton kernel needs a GPU): set SPARSIFY_DISABLE_TRITON=1.
    """
    if x.device.type != "cuda":
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # read when sparsify is first imported
    from sparsify import SparseCoder, SparseCoderConfig

    device = x.device
    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=init["W_enc"].shape[0], k=k), device=device)
    with torch.no_grad():
        sae.encoder.weight.copy_(init["W_enc"])
        sae.encoder.bias.copy_(init["b_enc"])
        sae.W_dec.copy_(init["W_dec"])
        sae.b_dec.copy_(init["b_dec"])
    opt = torch.optim.Adam(sae.parameters(), lr=lr, fused=True)

    def step(xb: torch.Tensor) -> None:
        out = sae(xb)
        opt.zero_grad(set_to_none=True)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    seconds = _peer_loop(step, x, batch, steps, device)
    with torch.no_grad():
        acts, idx, _ = sae.encode(held)
        return seconds, _fvu(held, sae.decode(acts, idx))


def run_saelens(init: dict, x: torch.Tensor, held: torch.Tensor, k: int, batch: int, steps: int, lr: float):
    """SAELens's TopKTrainingSAE through its training_forward_pass, Adam (no AuxK, as the other rows)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    device = x.device
    d, n_lat = x.shape[1], init["W_enc"].shape[0]
    cfg = TopKTrainingSAEConfig(d_in=d, d_sae=n_lat, k=k, device=str(device), aux_loss_coefficient=0.0,
                                rescale_acts_by_decoder_norm=False)  # fmt: skip
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(init["W_enc"].t())
        sae.b_enc.copy_(init["b_enc"])
        sae.W_dec.copy_(init["W_dec"])
        sae.b_dec.copy_(init["b_dec"])
    opt = torch.optim.Adam(sae.parameters(), lr=lr, fused=True)
    count = [0]

    def step(xb: torch.Tensor) -> None:
        out = sae.training_forward_pass(TrainStepInput(xb, {}, None, count[0], False))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        count[0] += 1

    seconds = _peer_loop(step, x, batch, steps, device)
    with torch.no_grad():
        return seconds, _fvu(held, sae.decode(sae.encode(held)))


def run_medsae(spec: SAESpec, x: torch.Tensor, held: torch.Tensor, steps: int) -> tuple[float, float]:
    """medsae's train_many over exactly steps + 1 batches; the first (warm-up) step is not timed."""
    device = x.device
    x_np = x[: spec.batch_size * (steps + 1)].cpu().numpy()
    data = TrainData(ArrayStore(x_np), np.arange(len(x_np)), device, 1e12)
    marks: list[float] = []

    def on_step(step: int) -> None:
        _sync(device)
        marks.append(time.perf_counter())

    result = train_many([TrainJob(spec)], data, device, on_step=on_step)[0]
    with torch.no_grad():
        return marks[-1] - marks[0], _fvu(held, result.sae.decode(result.sae.encode(held)))


def peer_table(args: argparse.Namespace, device: torch.device) -> None:
    """medsae (fp32, bf16-mixed) beside sparsify and SAELens: interleaved rounds, same data and init."""
    import importlib.util

    d, n_lat, k, batch, steps = args.d, args.latents, args.k, args.batch, args.steps
    peers = {"sparsify": run_sparsify, "SAELens": run_saelens}
    modules = {"sparsify": "sparsify", "SAELens": "sae_lens"}
    missing = [name for name, mod in modules.items() if importlib.util.find_spec(mod) is None]
    peers = {name: fn for name, fn in peers.items() if name not in missing}
    x = torch.from_numpy(planted(batch * (steps + 2), d, n_lat, k, seed=0)).to(device)
    held = torch.from_numpy(planted(min(8192, 2 * batch), d, n_lat, k, seed=1)).to(device)
    common = dict(arch="topk", d_sae=n_lat, k=k, batch_size=batch, epochs=1, auxk=False, b_dec_init="zeros",
                  normalize="none", lr=args.lr, lr_end=args.lr, warmup_steps=0, log_every=10**6)  # fmt: skip
    # the data order of train_many is a seeded permutation: hand every trainer the rows in that order
    from medsae.sae.data import epoch_order
    from medsae.sae.train import combined_seed

    order = epoch_order(batch * (steps + 1), combined_seed(0, 0), 0)
    x = torch.cat([x[torch.as_tensor(np.asarray(order))], x[batch * (steps + 1) :]])
    init_sae = SAE(SAEConfig.from_spec(SAESpec(**common), d), torch.Generator().manual_seed(combined_seed(0, 0)))
    init = {name: getattr(init_sae, name).detach().to(device) for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    trainers: dict[str, Any] = {
        "medsae fp32": lambda: run_medsae(SAESpec(**common, precision="fp32"), x, held, steps),
        "medsae bf16-mixed": lambda: run_medsae(SAESpec(**common, precision="bf16-mixed"), x, held, steps),
    }
    for name, fn in peers.items():
        trainers[name] = lambda fn=fn: fn(init, x, held, k, batch, steps, args.lr)
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    fvus: dict[str, float] = {}
    loads = []
    names = list(trainers)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # a new order every round
            seconds, fvu = trainers[name]()
            rates[name].append(batch * steps / seconds)
            fvus[name] = fvu
            print(f"round {r + 1}: {name} {rates[name][-1]:,.0f} samples/s, FVU {fvu:.4f}", file=sys.stderr, flush=True)
        loads.append(os.getloadavg()[0])
    print(
        f"\nmedsae beside peers on {device}: planted data (d={d}, {n_lat} atoms, {k} per sample), TopK latents="
        f"{n_lat}, k={k}, batch={batch}, {steps} timed steps per run, {args.rounds} interleaved rounds, same init, "
        f"Adam lr {args.lr}, no AuxK; threads={torch.get_num_threads()}, load average during rounds "
        f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs"
    )
    if missing:
        print(f"(not installed, left out: {', '.join(missing)}; see the module docstring)")
    fastest = None
    if peers:
        fastest = max(peers, key=lambda n: float(np.median(rates[n])))
    print(f"{'trainer':22s} {'samples/s':>10s} {'ratio vs ' + (fastest or 'peer'):>20s} {'final FVU':>10s}")
    for name in trainers:
        ratio = "-"
        if fastest is not None:
            ratio = f"{float(np.median([a / b for a, b in zip(rates[name], rates[fastest], strict=True)])):.2f}x"
        print(f"{name:22s} {float(np.median(rates[name])):10,.0f} {ratio:>20s} {fvus[name]:10.4f}")


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
    parser.add_argument("--peers", action="store_true", help="only the table beside sparsify and SAELens")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the peer table")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the peer table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.d, args.latents, args.batch = 256, 2048, 1024
    device = resolve_device(args.device)
    if args.peers:
        peer_table(args, device)
        return
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
        _, why = bf16_support(device)
        print(
            f"(bf16 row: the CPU's bf16 matmul, compared with the fp32 ceiling; {why}; precision 'auto' is fp32 "
            "on a CPU, the study preset's 'auto-bf16-mixed' is bf16 only where the CPU has bf16 units)"
        )

    ks = [4, 6, 8, 10, 12, 16, 24, 32]
    multi_steps = max(2, steps // 2)
    x_small = x_np[: batch * (multi_steps + 1)]
    one = medsae_pass(x_small, device, [spec(k_) for k_ in ks], batched=False)
    grouped = medsae_pass(x_small, device, [spec(k_) for k_ in ks], batched=True)
    seq = [medsae_pass(x_small, device, [spec(k_)]) for k_ in ks]
    t_seq, wall_seq = sum(r["seconds"] for r in seq), sum(r["wall"] for r in seq)
    print(
        f"\n8 TopK configs (k = {ks}), {one['steps']} timed steps each; wall includes data setup and the "
        "final statistics pass; batched GEMM = the 8 encoder matmuls as one baddbmm per step"
    )
    print(f"{'':34s} {'timed steps':>12s} {'wall':>9s}")
    print(f"{'one pass, 8 configs':34s} {one['seconds']:11.2f}s {one['wall']:8.2f}s")
    print(f"{'one pass, 8 configs, batched GEMM':34s} {grouped['seconds']:11.2f}s {grouped['wall']:8.2f}s")
    print(f"{'8 sequential runs':34s} {t_seq:11.2f}s {wall_seq:8.2f}s")
    ratio, wall_ratio = 100 * one["seconds"] / t_seq, 100 * one["wall"] / wall_seq
    print(f"{'one pass / sequential':34s} {ratio:11.0f}% {wall_ratio:8.0f}%")
    ratio, wall_ratio = 100 * grouped["seconds"] / t_seq, 100 * grouped["wall"] / wall_seq
    print(f"{'batched one pass / sequential':34s} {ratio:11.0f}% {wall_ratio:8.0f}%")


if __name__ == "__main__":
    main()

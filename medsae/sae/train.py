"""The SAE trainer: several SAE configurations trained in ONE pass over shared embeddings.

Each step reads one batch (a slice of a seeded permutation of the train rows, already on the
device), normalises it once per normalisation mode, and feeds it to every configuration of the
group. Per configuration (:class:`_Run`): Adam with a stateless warm-up + cosine schedule,
optional unit-norm decoder (gradient projection, then renormalisation), optional global
gradient-norm clip, BatchTopK threshold bookkeeping, and a "samples since fired" counter that
defines dead latents for AuxK.

Resumable: every ``checkpoint_every`` steps (but at most once per ``checkpoint_minutes``) and at
the end, each configuration writes its whole state (weights, optimiser, counters, threshold, log,
global RNG state) atomically into its work folder. The data
order is a pure function of ``(seed, epoch)`` (:func:`medsae.sae.data.epoch_order`), so a run
killed at any moment and resumed ends with the same weights as an uninterrupted one. Configurations
that were checkpointed at different steps are resumed together: the pass starts at the earliest
step and each configuration joins when the pass reaches its own step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsae.errors import MedsaeError
from medsae.progress import is_quiet
from medsae.sae.config import SAESpec
from medsae.sae.data import TrainData, epoch_order
from medsae.sae.models import FIRE_EPS, SAE, SAEConfig
from medsae.sae.precision import resolve_precision
from medsae.stage import as_section

#: Latents firing on more than this fraction of the train split count as dense.
DENSE_THRESHOLD = 0.1
#: Rows used for the geometric-median initialisation of b_dec.
GEOMETRIC_MEDIAN_ROWS = 16_384
CHECKPOINT = "train_state.pt"
#: Training history rows per run: about this many over the run, plus one at every epoch's end.
HISTORY_POINTS = 100


def shared_settings(spec: SAESpec) -> tuple[Any, ...]:
    """What configurations must agree on to share one pass over the data: batch size, epochs, shuffle, seed."""
    return (spec.batch_size, spec.epochs, spec.shuffle, spec.seed)


@dataclass
class TrainJob:
    """One configuration to train: its ``sae:`` section and where it keeps state.

    Plain data for ``spec`` (scripts, JSON) is validated into an :class:`SAESpec` on construction.
    """

    spec: SAESpec
    seed: int = 0  # the experiment's seed; combined with spec.seed
    work_dir: Path | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self.spec = as_section(SAESpec, self.spec)


@dataclass
class TrainResult:
    """A trained SAE and what happened while training it."""

    sae: SAE
    log: list[dict[str, Any]]
    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    #: ``{"epoch", "step", "samples", "loss", "fvu"}`` rows: means over the steps since the previous row.
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """'auto' = cuda, then mps, then cpu; anything else is passed to torch."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise MedsaeError(f"sae.device: unknown torch device '{name}'") from None


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The encoder matmul's dtype under ``sae.precision`` on ``device`` (:mod:`medsae.sae.precision`)."""
    return resolve_precision(precision, device).encoder


def lr_at(step: int, total: int, spec: SAESpec) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up from ``warmup_start·lr``, cosine to ``lr_end``.

    The warm-up lasts ``warmup_steps``, capped at ``warmup_max_fraction`` of ``total`` when that is set.
    """
    lr, lr_end = spec.lr, spec.lr_end
    warm = spec.warmup_steps
    if spec.warmup_max_fraction:
        warm = min(warm, int(spec.warmup_max_fraction * total))
    if step < warm:
        start = spec.warmup_start
        return lr * (start + (1 - start) * step / warm)
    progress = (step - warm) / max(1, total - warm)
    return lr_end + (lr - lr_end) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def combined_seed(experiment_seed: int, sae_seed: int) -> int:
    """The seed of initialisation and data order: the experiment's seed mixed with ``sae.seed``."""
    return int(np.random.SeedSequence([experiment_seed & 0xFFFFFFFF, sae_seed & 0xFFFFFFFF]).generate_state(1)[0])


def geometric_median(x: torch.Tensor, iters: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of x."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * max(1.0, float(y.norm())):
            y = y_new
            break
        y = y_new
    return y.float()


#: Execution settings that may change between a kill and the resume without invalidating a checkpoint.
_RESUME_INDEPENDENT = ("checkpoint_every", "checkpoint_minutes", "device", "log_every", "resident_max_gb")


def _fingerprint(spec: SAESpec, seed: int, n: int, d: int) -> str:
    """What a checkpoint must match to be resumed: the configuration, the seed and the data shape."""
    keyed = spec.model_dump(mode="json", exclude=set(_RESUME_INDEPENDENT))
    text = json.dumps({"params": keyed, "seed": seed, "n": n, "d": d}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _emit(line: str) -> None:
    if not is_quiet():
        print(line, file=sys.stderr, flush=True)


class _Run:
    """The training state of one configuration."""

    def __init__(self, job: TrainJob, data: TrainData, device: torch.device, total: int, init_cache: dict):
        self.job, self.spec = job, job.spec
        self.device = device
        self.total = total
        self.batch_size = self.spec.batch_size
        self.n = data.n
        self.per_epoch = steps_per_epoch(data.n, self.batch_size)
        self.history_every = max(1, total // HISTORY_POINTS)
        self.seed = combined_seed(job.seed, self.spec.seed)
        self.cfg = SAEConfig.from_spec(self.spec, data.d)
        self.sae = SAE(self.cfg, torch.Generator().manual_seed(self.seed)).to(device)
        self.precision = resolve_precision(self.spec.precision, device)
        self.dtype, self.decoder_dtype = self.precision.encoder, self.precision.decoder
        self.decoder_impl = self.spec.decoder_impl
        self.log_every = self.spec.log_every
        fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.spec.lr, **fused)
        self.counter = torch.zeros(self.cfg.d_sae, dtype=torch.int64, device=device)
        self.step = 0
        self.log: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self._sums = self._zero_sums()
        self._hist = self._zero_hist()
        self.fingerprint = _fingerprint(self.spec, job.seed, data.n, data.d)
        self.resumed_from = 0
        if not self._resume():
            self._data_init(data, init_cache)

    # -- initialisation ------------------------------------------------------------------------

    def _data_init(self, data: TrainData, cache: dict) -> None:
        """Normalisation statistics and b_dec from the train data (shared by configs through ``cache``)."""
        sae, mode = self.sae, self.cfg.normalize
        if mode == "center_scale":
            if "center_scale" not in cache:
                total = torch.zeros(data.d, dtype=torch.float64, device=self.device)
                for chunk in data.chunks(65_536):
                    total += chunk.double().sum(0)
                mean = total / data.n
                sq = torch.zeros((), dtype=torch.float64, device=self.device)
                for chunk in data.chunks(65_536):
                    sq += ((chunk.double() - mean) ** 2).sum()
                cache["center_scale"] = (mean.float(), float(torch.sqrt(sq / data.n).clamp_min(1e-12)))
            sae.set_normalization(*cache["center_scale"])
        init = self.spec.b_dec_init
        if init == "zeros":
            return
        key = (mode, init)
        if key not in cache:
            if init == "mean":
                total = torch.zeros(data.d, dtype=torch.float64, device=self.device)
                for chunk in data.chunks(65_536):
                    total += sae.normalize(chunk).double().sum(0)
                cache[key] = (total / data.n).float()
            else:
                sample = data.sample(GEOMETRIC_MEDIAN_ROWS, seed=self.seed)
                cache[key] = geometric_median(sae.normalize(sample))
        with torch.no_grad():
            sae.b_dec.copy_(cache[key])

    # -- checkpoints ---------------------------------------------------------------------------

    def _path(self) -> Path | None:
        return None if self.job.work_dir is None else Path(self.job.work_dir) / CHECKPOINT

    def _resume(self) -> bool:
        path = self._path()
        if path is None or not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            return False
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.counter.copy_(state["counter"])
        self.step = self.resumed_from = int(state["step"])
        self.log = list(state["log"])
        self._sums = {k: v.to(self.device) for k, v in state["sums"].items()}
        # checkpoints written before the history existed resume with the history from here on
        self.history = list(state.get("history", []))
        if "hist" in state:
            self._hist = {k: v.to(self.device) for k, v in state["hist"].items()}
        torch.set_rng_state(state["rng"])
        return True

    def save_checkpoint(self) -> None:
        path = self._path()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "fingerprint": self.fingerprint,
            "step": self.step,
            "sae": self.sae.state_dict(),
            "opt": self.opt.state_dict(),
            "counter": self.counter,
            "log": self.log,
            "sums": self._sums,
            "history": self.history,
            "hist": self._hist,
            "rng": torch.get_rng_state(),
        }
        tmp = path.with_name(path.name + ".part")
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    # -- one step ------------------------------------------------------------------------------

    def _zero_sums(self) -> dict[str, torch.Tensor]:
        names = ("loss", "recon", "aux", "fvu", "l0")
        return {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in names} | {
            "steps": torch.zeros((), dtype=torch.int64, device=self.device)
        }

    def _zero_hist(self) -> dict[str, torch.Tensor]:
        return {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in ("loss", "fvu", "steps")}

    def _samples_at(self, step: int) -> int:
        """Samples seen after ``step`` steps (every epoch's last batch may be short)."""
        epochs, rest = divmod(step, self.per_epoch)
        return epochs * self.n + min(rest * self.batch_size, self.n)

    def train_step(self, x_in: torch.Tensor, z: torch.Tensor | None = None) -> None:
        """One optimisation step on normalised inputs; ``z``: the pre-activations when already computed."""
        sae, cfg = self.sae, self.cfg
        lr = lr_at(self.step, self.total, self.spec)
        for group in self.opt.param_groups:
            group["lr"] = lr
        dead = self.counter >= cfg.dead_after if cfg.auxk else None
        out = sae.training_forward(x_in, dead, self.dtype, self.decoder_impl, self.decoder_dtype, z=z)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.unit_norm_decoder:
            sae.project_decoder_grad()
        if self.spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.spec.grad_clip, foreach=True)
        self.opt.step()
        if cfg.unit_norm_decoder:
            sae.normalize_decoder()
        if out.min_kept is not None:
            sae.observe_threshold(out.min_kept)
        self.counter += x_in.shape[0]
        self.counter.index_fill_(0, out.fired, 0)
        with torch.no_grad():
            centred = x_in - x_in.mean(0)
            fvu = ((x_in - out.x_hat) ** 2).sum() / (centred**2).sum().clamp_min(1e-30)
            s = self._sums
            s["loss"] += out.loss.detach().double()
            s["recon"] += out.recon.double()
            s["aux"] += out.aux.double()
            s["fvu"] += fvu.double()
            s["l0"] += out.l0.double()
            s["steps"] += 1
            h = self._hist
            h["loss"] += out.loss.detach().double()
            h["fvu"] += fvu.double()
            h["steps"] += 1
        self.step += 1
        if self.step % self.log_every == 0 or self.step == self.total:
            self._log_entry(lr)
        if self.step % self.history_every == 0 or self.step % self.per_epoch == 0 or self.step == self.total:
            self._history_row()

    def _history_row(self) -> None:
        """One history row: the mean loss and FVU of the steps since the previous row (one host sync)."""
        h = dict(zip(self._hist, torch.stack(list(self._hist.values())).tolist(), strict=True))
        steps = max(h["steps"], 1.0)
        self.history.append(
            {
                "epoch": -(-self.step // self.per_epoch),  # the epoch (from 1) this row's last step belongs to
                "step": self.step,
                "samples": self._samples_at(self.step),  # batches are deterministic: no counter to keep
                "loss": h["loss"] / steps,
                "fvu": h["fvu"] / steps,
            }
        )
        self._hist = self._zero_hist()

    def _log_entry(self, lr: float) -> None:
        s = {k: float(v) for k, v in self._sums.items()}
        steps = max(s.pop("steps"), 1.0)
        entry = {"step": self.step, "lr": lr, **{k: v / steps for k, v in s.items()}}
        entry["dead_fraction"] = float((self.counter >= self.cfg.dead_after).float().mean())
        if self.cfg.inner == "batchtopk":
            entry["threshold"] = float(self.sae.threshold)
        self.log.append(entry)
        self._sums = self._zero_sums()
        name = f" {self.job.name}" if self.job.name else ""
        _emit(
            f"[train{name}] step {self.step}/{self.total} loss {entry['loss']:.4g} fvu {entry['fvu']:.4f} "
            f"l0 {entry['l0']:.1f} dead {entry['dead_fraction']:.3f}"
        )


def _check_shared(jobs: list[TrainJob]) -> None:
    first = shared_settings(jobs[0].spec)
    for job in jobs[1:]:
        if shared_settings(job.spec) != first or job.seed != jobs[0].seed:
            raise MedsaeError(
                "train: configurations in one pass must share batch_size, epochs, shuffle, seed and the experiment seed"
            )


def _batches(data: TrainData, run0: _Run, start: int, total: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(step, raw batch) from ``start`` to ``total`` following the epochs' orders."""
    batch = run0.batch_size
    per_epoch = steps_per_epoch(data.n, batch)
    step = start
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        order = epoch_order(data.n, run0.seed, 0 if run0.spec.shuffle == "once" else epoch)
        for x in data.batches(order, batch, offset):
            if step >= total:
                return
            yield step, x
            step += 1


def total_steps(n: int, spec: SAESpec) -> int:
    """Optimisation steps of ``spec.epochs`` passes over ``n`` rows (the last batch of an epoch may be short)."""
    return max(1, math.ceil(spec.epochs * steps_per_epoch(n, spec.batch_size)))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimisation steps of one pass over ``n`` rows (the last batch may be short)."""
    return -(-n // batch_size)


def train_many(
    jobs: list[TrainJob],
    data: TrainData,
    device: torch.device,
    *,
    progress: Callable[[Iterable[Any], int, str], Iterable[Any]] | None = None,
    on_step: Callable[[int], None] | None = None,
    batched: bool | None = None,
) -> list[TrainResult]:
    """Train every job in one pass over ``data``; jobs must share batch size, epochs, shuffle and seed.

    ``on_step(step)`` is called after every step (after the checkpoint of that step, if any).
    ``batched``: compute the encoder matmuls of configurations with the same shapes as one batched
    GEMM per step (:func:`batched_pre_acts`); None = on a GPU only (on a CPU it is not faster).
    """
    if not jobs:
        return []
    _check_shared(jobs)
    total = total_steps(data.n, jobs[0].spec)
    init_cache: dict = {}
    runs = [_Run(job, data, device, total, init_cache) for job in jobs]
    if batched is None:
        batched = device.type == "cuda"
    for run in runs:
        if run.resumed_from == 0:
            name = f" {run.job.name}" if run.job.name else ""
            _emit(f"[train{name}] precision {run.precision.name}: {run.precision.reason}")
    start = min(r.step for r in runs)
    every = min(r.spec.checkpoint_every for r in runs)
    min_gap = 60 * min(r.spec.checkpoint_minutes for r in runs)
    last_save = time.monotonic()
    steps: Iterable[tuple[int, torch.Tensor]] = _batches(data, runs[0], start, total)
    if progress is not None:
        steps = progress(steps, total - start, "train")
    t0, samples = time.perf_counter(), 0
    for step, x_raw in steps:
        samples += x_raw.shape[0]
        normalised: dict[str, torch.Tensor] = {}
        active = [run for run in runs if run.step == step]
        for run in active:
            mode = run.cfg.normalize
            if mode not in normalised:
                normalised[mode] = run.sae.normalize(x_raw)
        pre = batched_pre_acts(active, normalised) if batched else {}
        for run in active:
            run.train_step(normalised[run.cfg.normalize], pre.get(id(run)))
        due = (step + 1) % every == 0 and time.monotonic() - last_save >= min_gap
        if due or step + 1 == total:
            for run in runs:
                run.save_checkpoint()
            last_save = time.monotonic()
        if on_step is not None:
            on_step(step + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    stats = final_statistics([r.sae for r in runs], data)
    results = []
    for run, stat in zip(runs, stats, strict=True):
        last = run.log[-1] if run.log else {}
        metrics = {"train_loss": last.get("loss", float("nan")), **stat}
        info = {
            "steps": total,
            "resumed_from": run.resumed_from,
            "n_train": data.n,
            "device": str(device),
            "precision": run.precision.name,
            "precision_requested": run.spec.precision,
            "precision_reason": run.precision.reason,
            "batched_encoder": bool(batched),
            "configs_in_pass": len(runs),
            "pass_seconds": seconds,
            # train rows pushed through the pass per second (each one fed to every configuration)
            "samples_per_s": samples / seconds if seconds > 0 else None,
        }
        results.append(TrainResult(run.sae.eval(), run.log, metrics, info, run.history))
    return results


def _gemm_group(run: _Run) -> tuple[Any, ...]:
    """Runs whose encoder matmuls can share one batched GEMM: same shapes, dtype and inputs."""
    return (run.cfg.normalize, run.cfg.d_in, run.cfg.d_sae, run.dtype)


def batched_pre_acts(runs: list[_Run], inputs: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Pre-activations ``z`` of every run (by ``id``) whose group has two or more members, one GEMM a group.

    ``z_g = (x - b_dec_g) W_enc_gᵀ + b_enc_g`` for all g of a group as one ``baddbmm`` of stacked
    operands (in each run's encoder dtype), which keeps a GPU busy where one config's matmul does not.
    """
    groups: dict[tuple[Any, ...], list[_Run]] = {}
    for run in runs:
        groups.setdefault(_gemm_group(run), []).append(run)
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for key, members in groups.items():
            if len(members) < 2:
                continue
            dtype, x = key[3], inputs[key[0]].float()
            x_c = torch.stack([x - r.sae.b_dec for r in members]).to(dtype)
            w_t = torch.stack([r.sae.W_enc.to(dtype) for r in members]).transpose(1, 2)
            b = torch.stack([r.sae.b_enc.to(dtype) for r in members]).unsqueeze(1)
            z = torch.baddbmm(b, x_c, w_t)
            for i, run in enumerate(members):
                out[id(run)] = z[i]
    return out


@torch.no_grad()
def final_statistics(saes: list[SAE], data: TrainData, chunk_rows: int = 8192) -> list[dict[str, float]]:
    """Inference-mode statistics of each SAE over the whole train split, in one pass.

    ``fvu`` = Σ‖x - x̂‖² / Σ‖x - mean‖² (per-dimension mean), ``l0_mean``, ``dead_fraction``
    (latents that never fire), ``dense_fraction`` (fire on more than 10 % of samples), ``mse``.
    """
    acc = [
        {
            "fires": torch.zeros(s.d_sae, dtype=torch.int64, device=data.device),
            "sse": 0.0,
            "sum": torch.zeros(s.d_in, dtype=torch.float64, device=data.device),
            "sq": torch.zeros(s.d_in, dtype=torch.float64, device=data.device),
            "nnz": 0,
        }
        for s in saes
    ]
    for chunk in data.chunks(chunk_rows):
        for sae, a in zip(saes, acc, strict=True):
            x = sae.normalize(chunk)
            codes = sae.encode(x)
            firing = codes.abs() > FIRE_EPS
            a["fires"] += firing.sum(0)
            a["nnz"] += int(firing.sum())
            a["sse"] += float(((x - sae.decode(codes)) ** 2).double().sum())
            a["sum"] += x.double().sum(0)
            a["sq"] += (x.double() ** 2).sum(0)
    n = data.n
    out = []
    for sae, a in zip(saes, acc, strict=True):
        sst = float((a["sq"] - a["sum"] ** 2 / n).sum())
        freq = a["fires"].double() / n
        out.append(
            {
                "fvu": a["sse"] / sst if sst > 0 else float("nan"),
                "mse": a["sse"] / (n * sae.d_in),
                "l0_mean": a["nnz"] / n,
                "dead_fraction": float((a["fires"] == 0).double().mean()),
                "dense_fraction": float((freq > DENSE_THRESHOLD).double().mean()),
            }
        )
    return out

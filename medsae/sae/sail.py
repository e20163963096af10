"""The study's (SAIL's) published SAE checkpoints, read into medsae's :class:`~medsae.sae.models.SAE`
(docs/method.md#study-checkpoints).

The study trains ``MatryoshkaSAELightning`` (``src/matryoshka_sae.py`` of pwesp/sail) and publishes
its SAEs as PyTorch Lightning ``.ckpt`` files: a ``torch.save`` dict whose ``state_dict`` holds the
module's tensors and whose ``hyper_parameters`` holds its constructor arguments. With
``D = max(dictionary_sizes)`` and ``d = input_dim``:

=============================  =======  ===================================================
``model.encoder.weight``       [D, d]   ``W_enc`` (row j = latent j); the tied decoder is its transpose
``model.encoder.bias``         [D]      ``b_enc``
``model.bias``                 [d]      ``b_dec``: pre-encoder centring and decoder bias
``model._threshold_sum``       []       sum over training batches of the smallest positive kept value
``model._threshold_count``     []       number of those batches
``model.inference_threshold``  []       θ as last updated in training (recomputed at load)
``model.decoder.weight``       [d, D]   only with ``tied_weights: false`` (never used by the study)
=============================  =======  ===================================================

``hyper_parameters``: ``input_dim``, ``dictionary_sizes`` (ascending), ``k_values`` (per level;
None = 5 % of each level), ``tied_weights``, ``normalize_decoder``, ``l1_coefficient``,
``diversity_coefficient``, ``learning_rate``, ``correlation_sample_batches``.

The study's inference (``compute_sparse_feature_activations.py``): ``x̃ = x / ‖x‖``,
``z = W_enc (x̃ - b_dec) + b_enc``, ``θ = _threshold_sum / _threshold_count`` (recomputed when the
checkpoint is loaded, whatever the count), codes ``max(0, z - θ)`` over all ``D`` latents. The SAE
built here (Matryoshka BatchTopK, values kept as selected, tied and detached, ``normalize: l2``,
``threshold_inference: shifted_relu``, θ ready after one batch) computes exactly that.

The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
code. :func:`import_checkpoint` is the train stage of a spec whose ``sae.checkpoint`` names such a
file: it checks the file against the spec's sha256, levels and embeddings, then writes the SAE as
any trained one (so encode, evaluate, interpret, report and export run on it).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medsae.embed.store import open_embeddings
from medsae.errors import MedsaeError, MissingInputError
from medsae.sae.config import MAX_K, MAX_LATENTS, SAESpec
from medsae.sae.data import TrainData, train_rows
from medsae.sae.models import SAE, SAEConfig
from medsae.sae.train import TrainResult, final_statistics, resolve_device

if TYPE_CHECKING:
    from medsae.stage import StageContext

#: The study's module keeps its SAE under this attribute (``self.model``).
PREFIX = "model."
#: State-dict keys (after the prefix) every checkpoint has; ``inference_threshold`` may be present, and
#: ``decoder.weight`` must be exactly when the weights are untied.
REQUIRED = ("encoder.weight", "encoder.bias", "bias", "_threshold_sum", "_threshold_count")
#: The study's level budgets when ``k_values`` is None (``MatryoshkaSAE.forward``): 5 % of each level.
DEFAULT_K_FRACTION = 0.05


class SailCheckpointError(MedsaeError):
    """A file that is not one of the study's SAE checkpoints, or one that does not fit (one line)."""


@dataclass(frozen=True)
class SailCheckpoint:
    """What a study checkpoint holds, mapped onto medsae's SAE configuration."""

    path: Path
    config: SAEConfig
    tensors: dict[str, torch.Tensor]  # medsae names: W_enc, b_enc, b_dec, W_dec (untied only), threshold...
    theta: float  # the inference threshold the study computes at load
    hyper_parameters: dict[str, Any] = field(default_factory=dict)  # JSON-able ones
    epoch: int | None = None
    global_step: int | None = None

    @property
    def config_name(self) -> str:
        """The study's name for the configuration, ``D_128_512_2048_8192_K_5_10_20_40``."""
        return "D_" + "_".join(map(str, self.config.levels)) + "_K_" + "_".join(map(str, self.config.level_k))

    def to_sae(self) -> SAE:
        """The SAE in eval mode, frozen, on the CPU."""
        sae = SAE(self.config)
        sae.load_state_dict({**sae.state_dict(), **self.tensors})
        return sae.requires_grad_(False).eval()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (lower-case hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise MissingInputError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise SailCheckpointError(f"{path}: not a file (expected the study's Lightning .ckpt)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle, zip or torch error: the file is not a (plain) torch checkpoint
        first = (str(err).strip().splitlines() or [""])[0][:160]
        detail = next((ln.strip() for ln in str(err).splitlines() if "Unsupported global" in ln), first)[:200]
        raise SailCheckpointError(
            f"{path}: not a PyTorch checkpoint medsae can read safely ({type(err).__name__}: {detail})"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise SailCheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict' dict)")
    if not isinstance(data.get("hyper_parameters"), dict):
        raise SailCheckpointError(f"{path}: not a Lightning checkpoint of the study's SAE (no 'hyper_parameters')")
    return data


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SailCheckpointError(f"{where}: expected an integer in [{lo}, {hi}], got {repr(value)[:80]}")
    return int(value)


def _int_list(value: Any, where: str, hi: int) -> list[int]:
    if not isinstance(value, list | tuple) or not value or len(value) > 64:
        raise SailCheckpointError(f"{where}: expected a list of 1 to 64 integers, got {repr(value)[:80]}")
    return [_int(v, f"{where}[{i}]", 1, hi) for i, v in enumerate(value)]


def _levels(path: Path, hp: dict[str, Any]) -> tuple[int, list[int], list[int]]:
    """(input_dim, dictionary_sizes, k_values) from the hyper-parameters, checked."""
    where = f"{path}: hyper_parameters"
    if "input_dim" not in hp or "dictionary_sizes" not in hp:
        raise SailCheckpointError(f"{where}: 'input_dim' or 'dictionary_sizes' missing (not the study's SAE module)")
    d = _int(hp["input_dim"], f"{where}.input_dim", 1, 1 << 20)
    sizes = _int_list(hp["dictionary_sizes"], f"{where}.dictionary_sizes", MAX_LATENTS)
    if any(a >= b for a, b in zip(sizes, sizes[1:], strict=False)):
        raise SailCheckpointError(f"{where}.dictionary_sizes: must be strictly ascending, got {sizes}")
    if hp.get("k_values") is None:
        ks = [max(1, int(DEFAULT_K_FRACTION * size)) for size in sizes]
    else:
        ks = _int_list(hp["k_values"], f"{where}.k_values", MAX_K)
    if len(ks) != len(sizes):
        raise SailCheckpointError(f"{where}: {len(ks)} k_values for {len(sizes)} dictionary_sizes")
    for i, (k, size) in enumerate(zip(ks, sizes, strict=True)):
        if k > size:
            raise SailCheckpointError(f"{where}.k_values[{i}]: {k} exceeds its level's size {size}")
    return d, sizes, ks


def _tensors(path: Path, state: dict[str, Any], d: int, n: int, tied: bool) -> dict[str, torch.Tensor]:
    """The state dict's tensors under medsae's names, every shape and value checked."""
    expected = set(REQUIRED) | {"inference_threshold"} | (set() if tied else {"decoder.weight"})
    foreign = sorted(str(k) for k in state if not str(k).startswith(PREFIX) or str(k)[len(PREFIX) :] not in expected)
    if foreign:
        raise SailCheckpointError(f"{path}: state_dict has '{foreign[0]}', not a key of the study's SAE module")
    names = {k[len(PREFIX) :]: k for k in state}
    missing = [PREFIX + k for k in (*REQUIRED, *(() if tied else ("decoder.weight",))) if k not in names]
    if missing:
        raise SailCheckpointError(f"{path}: state_dict lacks '{missing[0]}' (not the study's SAE module)")
    shapes = {"encoder.weight": (n, d), "encoder.bias": (n,), "bias": (d,), "decoder.weight": (d, n)}
    got: dict[str, torch.Tensor] = {}
    for short, key in names.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise SailCheckpointError(f"{path}: state_dict '{key}' is not a tensor")
        want = shapes.get(short, ())
        if tuple(value.shape) != want:
            raise SailCheckpointError(
                f"{path}: state_dict '{key}' has shape {list(value.shape)}, expected {list(want)} "
                f"(input_dim {d}, largest dictionary {n})"
            )
        if short != "inference_threshold" and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise SailCheckpointError(f"{path}: state_dict '{key}' holds non-finite values")
        got[short] = value
    return got


def _theta(path: Path, total: torch.Tensor, count: torch.Tensor) -> tuple[float, int]:
    """θ as the study recomputes it at load: ``(_threshold_sum / _threshold_count).item()`` in fp32."""
    n = int(count)
    if n < 1:
        raise SailCheckpointError(f"{path}: no inference-threshold statistics (model._threshold_count = {n})")
    theta = float(total.float() / count)
    if not math.isfinite(theta):
        raise SailCheckpointError(f"{path}: inference threshold is not finite")
    return theta, n


def _plain(hp: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able hyper-parameters (numbers, strings, booleans, None and lists of them)."""
    simple = (int, float, str, bool, type(None))
    return {
        str(k): list(v) if isinstance(v, list | tuple) else v
        for k, v in hp.items()
        if isinstance(v, simple) or (isinstance(v, list | tuple) and all(isinstance(x, simple) for x in v))
    }


def read_sail_checkpoint(path: str | Path) -> SailCheckpoint:
    """Read and check a study checkpoint; one :class:`SailCheckpointError` line when it is not one."""
    path = Path(path)
    data = _load(path)
    hp = data["hyper_parameters"]
    d, sizes, ks = _levels(path, hp)
    tied = hp.get("tied_weights", True)
    if not isinstance(tied, bool):
        raise SailCheckpointError(f"{path}: hyper_parameters.tied_weights: expected true or false, got {tied!r}")
    raw = _tensors(path, data["state_dict"], d, sizes[-1], tied)
    theta, count = _theta(path, raw["_threshold_sum"], raw["_threshold_count"])
    config = SAEConfig(
        d_in=d,
        d_sae=sizes[-1],
        arch="matryoshka",
        levels=sizes,
        level_k=ks,
        inner="batchtopk",
        topk_relu=False,
        tied=tied,
        tied_detached=tied,
        unit_norm_decoder=False,
        normalize="l2",
        threshold_mode="running_mean",
        threshold_warmup=1,  # the study uses θ whenever any batch was counted
        threshold_inference="shifted_relu",
        auxk=False,
    )
    tensors = {
        "W_enc": raw["encoder.weight"].float().contiguous(),
        "b_enc": raw["encoder.bias"].float().contiguous(),
        "b_dec": raw["bias"].float().contiguous(),
        "threshold": torch.tensor(theta, dtype=torch.float32),
        "threshold_sum": raw["_threshold_sum"].double().reshape(()),
        "threshold_count": torch.tensor(count, dtype=torch.int64),
    }
    if not tied:
        tensors["W_dec"] = raw["decoder.weight"].float().t().contiguous()
    return SailCheckpoint(
        path=path,
        config=config,
        tensors=tensors,
        theta=theta,
        hyper_parameters=_plain(hp),
        epoch=data.get("epoch") if isinstance(data.get("epoch"), int) else None,
        global_step=data.get("global_step") if isinstance(data.get("global_step"), int) else None,
    )


def check_width(ckpt: SailCheckpoint, width: int, what: str) -> None:
    """One line when the checkpoint's input width is not the embeddings' (``what`` names them)."""
    if ckpt.config.d_in != width:
        raise SailCheckpointError(
            f"{ckpt.path}: the SAE takes {ckpt.config.d_in}-wide inputs (hyper_parameters.input_dim), "
            f"{what} are {width} wide"
        )


def import_checkpoint(ctx: StageContext) -> TrainResult:
    """The train stage of a spec with ``sae.checkpoint``: the checked SAE and its train-split statistics,
    which the stage writes like a trained SAE's."""
    spec = ctx.section(SAESpec)
    path = Path(spec.checkpoint or "")
    if not path.is_file():
        raise MissingInputError(f"sae.checkpoint: {path} not found")
    digest = file_sha256(path)
    if digest != spec.checkpoint_sha256:
        raise SailCheckpointError(
            f"sae.checkpoint: {path} has sha256 {digest[:16]}..., the spec pins {str(spec.checkpoint_sha256)[:16]}... "
            "(another file; `medsae import sail` writes a spec for it)"
        )
    ckpt = read_sail_checkpoint(path)
    if (spec.levels, spec.level_k) != (ckpt.config.levels, ckpt.config.level_k):
        raise SailCheckpointError(
            f"sae.levels / sae.level_k: the spec says {spec.levels} / {spec.level_k}, {path} holds "
            f"{ckpt.config.levels} / {ckpt.config.level_k}"
        )
    store = open_embeddings(ctx.inputs["embed"])
    check_width(ckpt, store.d, "the embeddings")
    device = resolve_device(spec.device)
    t0 = time.perf_counter()
    sae = ckpt.to_sae().to(device)
    rows = train_rows(store, ctx.inputs["slices"])
    data = TrainData(store, rows, device, spec.resident_max_gb * 2**30)
    metrics = final_statistics([sae], data)[0]
    info = {
        "imported": {
            "format": "sail-lightning",
            "file": path.name,
            "sha256": digest,
            "config": ckpt.config_name,
            "epoch": ckpt.epoch,
            "global_step": ckpt.global_step,
            "theta": ckpt.theta,
            "hyper_parameters": ckpt.hyper_parameters,
        },
        "steps": ckpt.global_step or 0,
        "resumed_from": 0,
        "n_train": data.n,
        "device": str(device),
        "precision": "fp32",
        "configs_in_pass": 1,
        "pass_seconds": time.perf_counter() - t0,
        "samples_per_s": None,
    }
    return TrainResult(sae, [], metrics, info)

"""SAE checkpoints: ``sae.safetensors`` + ``cfg.json`` (SAELens layout), loadable without the spec.

A train folder holds:

* ``sae.safetensors``: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc`` [d_sae],
  ``b_dec`` [d_in] (SAELens names and orientations; a tied SAE stores W_dec = W_encᵀ too), plus
  medsae's buffers: ``norm_mean``, ``norm_scale`` (input normalisation), ``threshold``,
  ``threshold_sum``, ``threshold_count`` (BatchTopK inference threshold).
* ``cfg.json``: SAELens' config fields (architecture, d_in, d_sae, dtype, ...) and a ``medsae``
  block with the full :class:`~medsae.sae.models.SAEConfig`, which is what :func:`load_sae` uses.

:func:`export_saelens` writes a folder that SAELens' ``SAE.load_from_disk`` reads
(``cfg.json`` + ``sae_weights.safetensors``) and that computes the same codes: BatchTopK with
JumpReLU inference becomes ``jumprelu`` (θ per latent), the study's shifted ReLU
``max(0, z - θ)`` becomes ``standard`` with ``b_enc - θ``, per-sample L2 inputs become
``constant_norm_rescale`` (the √d_in factor folded into the weights) and dataset-level centring +
scaling is folded into the weights completely.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medsae.errors import MedsaeError, MissingInputError
from medsae.sae.models import SAE, SAEConfig

WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
FORMAT_VERSION = 1
_BUFFERS = ("norm_mean", "norm_scale", "threshold", "threshold_sum", "threshold_count")


def _saelens_cfg(cfg: SAEConfig, architecture: str, normalize: str, **extra: Any) -> dict[str, Any]:
    return {
        "architecture": architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": normalize,
        "reshape_activations": "none",
        **extra,
        "metadata": {"hook_name": "embedding", "model_name": None},
    }


def save_sae(sae: SAE, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``sae.safetensors`` and ``cfg.json`` into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    tensors = {
        "W_enc": sae.W_enc.detach().t(),
        "W_dec": sae.decoder_weight.detach(),
        "b_enc": sae.b_enc.detach(),
        "b_dec": sae.b_dec.detach(),
        **{name: getattr(sae, name).detach() for name in _BUFFERS},
    }
    save_file({k: v.cpu().contiguous().clone() for k, v in tensors.items()}, str(out / WEIGHTS))
    arch = {"topk": "topk", "batchtopk": "batchtopk", "relu": "standard"}[cfg.inner]
    body = _saelens_cfg(cfg, arch, "none", k=cfg.level_k[-1])
    body["medsae"] = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), **(extra or {})}
    (out / CONFIG).write_text(json.dumps(body, indent=1, sort_keys=True))
    return out


def read_config(train_dir: str | Path) -> dict[str, Any]:
    """The ``cfg.json`` of a train folder (one-line errors when missing or not medsae's)."""
    path = Path(train_dir) / CONFIG
    if not path.is_file():
        raise MissingInputError(f"{path}: SAE config not found (not a completed train folder)")
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MedsaeError(f"{path}: invalid JSON ({err})") from None
    if "medsae" not in body or "config" not in body["medsae"]:
        raise MedsaeError(f"{path}: no 'medsae' block; not written by medsae")
    return body


def load_sae(train_dir: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Rebuild the SAE of a train folder from its own files (no spec needed), in eval mode, frozen."""
    train_dir = Path(train_dir)
    cfg = SAEConfig.from_dict(read_config(train_dir)["medsae"]["config"])
    path = train_dir / WEIGHTS
    if not path.is_file():
        raise MissingInputError(f"{path}: SAE weights not found")
    tensors = load_file(str(path))
    sae = SAE(cfg)
    state = {"W_enc": tensors["W_enc"].t(), "b_enc": tensors["b_enc"], "b_dec": tensors["b_dec"]}
    if not cfg.tied:
        state["W_dec"] = tensors["W_dec"]
    state.update({name: tensors[name] for name in _BUFFERS})
    try:
        sae.load_state_dict(state)
    except RuntimeError as err:
        raise MedsaeError(f"{path}: weights do not match cfg.json ({str(err).splitlines()[0]})") from None
    return sae.requires_grad_(False).to(device).eval()


@torch.no_grad()
def export_saelens(train_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the SAE of ``train_dir`` as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    sae = load_sae(train_dir)
    cfg = sae.cfg
    w_enc = sae.W_enc.t().clone()  # [d_in, d_sae]
    w_dec = sae.decoder_weight.clone()
    b_enc, b_dec = sae.b_enc.clone(), sae.b_dec.clone()
    extra: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    if cfg.inner == "relu":
        arch = "standard"
    elif cfg.inner == "batchtopk" and sae.threshold_ready():
        theta = float(sae.threshold)
        if cfg.threshold_inference == "shifted_relu":
            arch, b_enc = "standard", b_enc - theta
        else:
            arch = "jumprelu"
            tensors["threshold"] = torch.full((cfg.d_sae,), theta)
    else:
        if not cfg.topk_relu:
            raise MedsaeError(f"{train_dir}: a TopK SAE without ReLU has no SAELens equivalent")
        arch, extra = "topk", {"k": cfg.level_k[-1]}
    if cfg.normalize == "l2":
        normalize, root = "constant_norm_rescale", math.sqrt(cfg.d_in)
        w_enc, w_dec, b_dec = w_enc / root, w_dec * root, b_dec * root
    elif cfg.normalize == "center_scale":
        normalize, mean, scale = "none", sae.norm_mean.clone(), float(sae.norm_scale)
        w_enc, w_dec, b_dec = w_enc / scale, w_dec * scale, mean + scale * b_dec
    else:
        normalize = "none"
    tensors.update(W_enc=w_enc, W_dec=w_dec, b_enc=b_enc, b_dec=b_dec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(out / SAELENS_WEIGHTS))
    body = _saelens_cfg(cfg, arch, normalize, **extra)
    body["medsae_source"] = {"train_dir": str(train_dir), "config": cfg.to_dict()}
    (out / CONFIG).write_text(json.dumps(body, indent=1, sort_keys=True))
    return out


def resolve_train_dir(experiment: str, registry_path: str | Path | None = None) -> Path:
    """The completed train folder of a registered experiment (via the registry)."""
    from medsae.registry import Registry

    registry = Registry(registry_path)
    rows = registry.query(
        "SELECT s.artifact_dir FROM experiments e JOIN experiment_stages es USING (experiment_id) "
        "JOIN stages s ON s.stage_key = es.stage_key WHERE e.name = ? AND es.kind = 'train' "
        "ORDER BY e.created_at DESC LIMIT 1",
        [experiment],
    )
    if not rows or not rows[0]["artifact_dir"]:
        raise MedsaeError(f"{registry.path}: no trained SAE for experiment '{experiment}' (run `medsae exp run` first)")
    path = Path(rows[0]["artifact_dir"])
    if not path.is_dir():
        raise MissingInputError(f"{path}: train folder of '{experiment}' is missing")
    return path

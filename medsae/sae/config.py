"""The ``sae:`` section: the sparse autoencoder and its training recipe.

Every field is documented where it is declared. ``preset: study`` fills in the study's exact
recipe (docs/method.md#study-preset) for every field the spec does not set explicitly; see
:data:`STUDY_PRESET` for the list of fields it sets and why.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from medsae.specbase import PathStr, Section, added_field, execution_only, seed_field

#: Fields that ``preset: study`` fills in (explicitly given fields win). Each value is the study's
#: (docs/method.md#study-preset):
#: * Matryoshka BatchTopK, per-level independent selection, no ReLU on the kept values;
#: * tied weights whose decoder reads the encoder weight *detached*;
#: * no unit-norm constraint after init; every medsae SAE starts from uniform random rows
#:   scaled to unit norm, which is what the study's Xavier-uniform init + row scaling gives;
#: * b_dec = 0; per-sample L2 inputs;
#: * inference threshold θ = running mean over the whole run of the smallest positive kept value
#:   at the largest level, applied as a shifted ReLU max(0, z - θ), per-sample top-k before 100
#:   batches;
#: * no AuxK, no L1;
#: * Adam lr 1e-4, linear warm-up from 0.1·lr over min(1000, steps/10) steps, then cosine to 1e-6,
#:   batch 2048, 100 epochs, global grad-norm clip 0.5, one shuffle reused every epoch;
#: * Lightning's bf16-mixed precision (encoder and decoder matmuls in bf16, fp32 weights) where the
#:   hardware has bf16 matmul units; fp32 elsewhere, where emulated bf16 would only be slower.
#: ``levels`` and ``level_k`` come from the grid (docs/method.md#study-grid) and must be given.
STUDY_PRESET: dict[str, Any] = {
    "arch": "matryoshka",
    "matryoshka_inner": "batchtopk",
    "topk_relu": False,
    "tied": True,
    "tied_detached": True,
    "unit_norm_decoder": False,
    "b_dec_init": "zeros",
    "normalize": "l2",
    "threshold_mode": "running_mean",
    "threshold_inference": "shifted_relu",
    "threshold_warmup": 100,
    "auxk": False,
    "l1_coeff": 0.0,
    "lr": 1e-4,
    "lr_end": 1e-6,
    "warmup_steps": 1000,
    "warmup_max_fraction": 0.1,
    "warmup_start": 0.1,
    "batch_size": 2048,
    "epochs": 100,
    "grad_clip": 0.5,
    "shuffle": "once",
    "precision": "auto-bf16-mixed",
}

#: Fields that say what an imported study checkpoint computes (``sae.checkpoint``): they must keep
#: the study's values, so the spec describes the SAE the file holds.
CHECKPOINT_FIXED = ("arch", "matryoshka_inner", "topk_relu", "tied", "normalize", "threshold_inference")
#: Optional fields left out of a dumped spec while unset, so specs without them keep their keys and hash.
#: Largest dictionary (latents) an SAE may have.
MAX_LATENTS = 2**20
#: Largest k (active latents per sample).
MAX_K = 65_536
#: Largest batch x latents of one optimisation step (2^32 pre-activations, 16 GiB in fp32).
MAX_BATCH_LATENTS = 2**32

LevelSize = Annotated[int, Field(ge=1, le=MAX_LATENTS)]
LevelK = Annotated[int, Field(ge=1, le=MAX_K)]

#: Choices shared by the spec (``SAESpec``) and the checkpoint's ``SAEConfig``.
Arch = Literal["topk", "batchtopk", "matryoshka", "relu_l1"]
Normalize = Literal["l2", "center_scale", "none"]
ThresholdMode = Literal["ema", "running_mean"]
ThresholdInference = Literal["jumprelu", "shifted_relu"]


def apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """Raw ``sae:`` data with its preset's fields filled in where the data does not set them.

    ``preset: study`` fills every field of :data:`STUDY_PRESET`; ``none`` (the default) changes nothing.
    Applied before validation, so a dumped spec (every field explicit) validates to itself.
    """
    if data.get("preset") == "study":
        return {**STUDY_PRESET, **data}
    return data


class SAESpec(Section):
    """Architecture and training; ``preset: study`` fills in the study's exact recipe."""

    preset: Literal["none", "study"] = Field(
        "none",
        description="'study' = the study's Matryoshka BatchTopK recipe for every field not set explicitly.",
    )
    arch: Arch = Field(
        "topk",
        description="Activation family: per-sample TopK, BatchTopK (k·batch largest of the batch, a "
        "threshold at inference), Matryoshka (nested prefixes with per-level budgets), or ReLU + L1.",
    )
    d_sae: int | None = Field(
        None, ge=1, le=MAX_LATENTS, description="Number of latents (default: expansion x input dim)."
    )
    expansion: float = Field(8.0, gt=0, le=256, description="d_sae = expansion x d_in when d_sae is not given.")
    k: int = Field(
        10, ge=1, le=MAX_K, description="Active latents per sample (TopK) or per sample on average (BatchTopK)."
    )
    levels: list[LevelSize] | None = Field(
        None, max_length=64, description="Matryoshka nested dictionary sizes (ascending)."
    )
    level_k: list[LevelK] | None = Field(None, max_length=64, description="Matryoshka budget per level.")
    matryoshka_inner: Literal["batchtopk", "topk"] = Field("batchtopk", description="Per-level activation.")
    topk_relu: bool = Field(
        True,
        description="ReLU on the kept values; false = keep them as they are, negatives included (study).",
    )
    tied: bool = Field(False, description="Decoder = encoder transpose (one weight matrix).")
    tied_detached: bool = Field(
        False,
        description="With tied weights, the decoder reads the encoder weight detached, so the dictionary "
        "learns only through the encoder path (what the study's code does).",
    )
    unit_norm_decoder: bool = Field(
        True, description="Keep decoder rows at unit norm (the gradient component along each row is removed)."
    )
    b_dec_init: Literal["zeros", "mean", "geometric_median"] = Field(
        "mean",
        description="Pre-encoder bias init: zeros, or the mean / geometric median of the normalised inputs.",
    )
    normalize: Normalize = Field(
        "l2",
        description="Input normalisation, stored in the checkpoint: 'l2' = each sample to unit norm (study), "
        "'center_scale' = subtract the train mean and divide by one scalar so the mean squared norm is 1.",
    )
    threshold_mode: ThresholdMode = Field(
        "ema",
        description="BatchTopK inference threshold θ from the smallest positive kept value of each training "
        "batch at the largest level: an exponential moving average, or the mean over the whole run (study).",
    )
    threshold_decay: float = Field(0.99, ge=0, lt=1, description="Decay of the 'ema' threshold.")
    threshold_warmup: int = Field(
        100,
        ge=0,
        le=10_000_000,
        description="Batches before θ counts as estimated; before that inference uses per-sample top-k.",
    )
    threshold_inference: ThresholdInference = Field(
        "jumprelu", description="BatchTopK inference: z·[z > θ] (JumpReLU) or max(0, z - θ) (study)."
    )
    l1_coeff: float = Field(0.0, ge=0, le=1e6, description="L1 penalty (relu_l1), weighted by decoder row norms.")
    auxk: bool = Field(True, description="AuxK loss on dead latents (TopK family).")
    k_aux: int | None = Field(None, ge=1, le=MAX_K, description="Dead latents used by AuxK (default d_in // 2).")
    aux_coeff: float = Field(1 / 32, ge=0, le=1e3, description="AuxK loss coefficient.")
    dead_after: int = Field(
        20_000, ge=1, le=10**12, description="A latent is dead after this many samples without firing."
    )
    lr: float = Field(2e-4, gt=0, le=1, description="Peak learning rate (Adam).")
    lr_end: float = Field(0.0, ge=0, le=1, description="Final learning rate of the cosine schedule.")
    warmup_steps: int = Field(100, ge=0, le=10_000_000, description="Linear warm-up steps.")
    warmup_max_fraction: float | None = Field(
        None, gt=0, le=1, description="Cap the warm-up at this fraction of all steps (study: 0.1)."
    )
    warmup_start: float = Field(0.0, ge=0, le=1, description="Learning rate at step 0 as a fraction of lr.")
    batch_size: int = Field(
        4096, ge=1, le=1_048_576, description="Samples per optimisation step (batch x latents at most 2^32)."
    )
    epochs: float = Field(10, gt=0, le=10_000, description="Passes over the training split.")
    shuffle: Literal["epoch", "once"] = Field(
        "epoch", description="New random order every epoch, or one order reused by every epoch (study)."
    )
    grad_clip: float | None = Field(None, gt=0, le=1e6, description="Global gradient-norm clip.")
    seed: int = seed_field(0, "Seed of initialisation and shuffling (combined with the experiment seed).")
    checkpoint: PathStr | None = execution_only(
        None,
        "A study (SAIL) Lightning .ckpt to import instead of training (`medsae import sail` writes this); a "
        "relative path is taken from the spec file's folder. The file is identified by checkpoint_sha256.",
        added=True,
    )
    checkpoint_sha256: str | None = added_field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of sae.checkpoint (lower-case hex): the file's identity in the train key.",
    )
    input: Literal["pooled", "tokens"] = added_field(
        "pooled",
        description="What the SAE is trained on: the pooled vector of each slice, or the spatial tokens the "
        "embed stage stored (embed.tokens_per_slice > 0; every token of a train slice is one sample). A token "
        "SAE's slice code is the maximum of its stored tokens' codes (docs/method.md#token-sae).",
    )
    checkpoint_every: int = execution_only(200, "Save a resumable checkpoint every N steps.", ge=1, le=10**9)
    checkpoint_minutes: float = execution_only(
        0.0, "...but at most once per this many minutes (checkpoints of big sweeps are large).", ge=0, le=100_000
    )
    device: str = execution_only("auto", "auto = cuda, then mps, then cpu.")
    precision: Literal["auto", "fp32", "bf16", "bf16-mixed", "auto-bf16-mixed"] = execution_only(
        "auto",
        "Training matmul precision (weights stay fp32; encode is fp32): bf16 = the encoder matmul in bf16; "
        "bf16-mixed = encoder and decoder matmuls, forward and backward, in bf16 as the study's Lightning "
        "bf16-mixed (emulated where the hardware lacks bf16); auto = bf16 encoder on a GPU with bf16, else fp32; "
        "auto-bf16-mixed (preset: study) = bf16-mixed where the GPU or CPU has bf16 matmul units, else fp32 "
        "(the train log says which and why).",
    )
    decoder_impl: Literal["auto", "sparse", "dense"] = execution_only(
        "auto",
        "Decoder of the TopK family: gather the active rows (sparse), a dense matmul, or choose by cost.",
    )
    log_every: int = execution_only(50, "Steps between progress lines and train-log entries.", ge=1, le=10**9)
    resident_max_gb: float = execution_only(
        16.0, "Train embeddings larger than this are streamed in chunks from the shards.", gt=0, le=100_000
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return apply_preset(data) if isinstance(data, dict) else data

    def with_resolved_checkpoint(self, resolve: Callable[[str], Path]) -> SAESpec:
        """This section with ``checkpoint`` made absolute by ``resolve`` (the spec's path resolver)."""
        if self.checkpoint is None:
            return self
        return self.model_copy(update={"checkpoint": str(resolve(self.checkpoint))})

    @model_validator(mode="after")
    def _check_levels(self) -> SAESpec:
        if self.arch == "matryoshka":
            if not self.levels or not self.level_k or len(self.levels) != len(self.level_k):
                raise ValueError("matryoshka needs 'levels' and 'level_k' of the same length")
            if sorted(self.levels) != self.levels or len(set(self.levels)) != len(self.levels):
                raise ValueError("'levels' must be strictly ascending")
            for size, k in zip(self.levels, self.level_k, strict=True):
                if k > size:
                    raise ValueError(f"level budget k={k} exceeds level size {size}")
        if self.tied_detached and not self.tied:
            raise ValueError("'tied_detached' needs 'tied: true'")
        if self.checkpoint is not None and self.input != "pooled":
            raise ValueError("'checkpoint' holds a study SAE trained on pooled vectors: 'input' must be 'pooled'")
        if (self.checkpoint is None) != (self.checkpoint_sha256 is None):
            raise ValueError("'checkpoint' and 'checkpoint_sha256' go together (`medsae import sail` writes both)")
        if self.checkpoint is not None:
            for name in CHECKPOINT_FIXED:
                if getattr(self, name) != STUDY_PRESET[name]:
                    raise ValueError(
                        f"'checkpoint' holds a study SAE: '{name}' must be {json.dumps(STUDY_PRESET[name])} "
                        "(use preset: study)"
                    )
        if self.arch in ("topk", "batchtopk") and self.d_sae is not None and self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}")
        latents = self.levels[-1] if self.arch == "matryoshka" and self.levels else self.d_sae
        if latents is not None and self.batch_size * latents > MAX_BATCH_LATENTS:
            raise ValueError(
                f"batch_size x latents is {self.batch_size * latents:,} activations per step, more than "
                f"{MAX_BATCH_LATENTS:,} (lower batch_size or the dictionary size)"
            )
        return self

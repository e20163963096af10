"""The ``sae:`` section: the sparse autoencoder and its training recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medsae.specbase import Section, execution_only


class SAESpec(Section):
    """Architecture and training; ``preset: study`` fills in the study's exact recipe."""

    preset: Literal["none", "study"] = Field("none", description="'study' = the study's Matryoshka BatchTopK.")
    arch: Literal["topk", "batchtopk", "matryoshka", "relu_l1"] = Field("topk", description="Activation family.")
    d_sae: int | None = Field(None, ge=1, description="Number of latents (default: expansion x input dim).")
    expansion: float = Field(8.0, gt=0, description="d_sae = expansion x d_in when d_sae is not given.")
    k: int = Field(10, ge=1, description="Active latents per sample (TopK) or per sample on average (BatchTopK).")
    levels: list[int] | None = Field(None, description="Matryoshka nested dictionary sizes (ascending).")
    level_k: list[int] | None = Field(None, description="Matryoshka budget per level.")
    matryoshka_inner: Literal["batchtopk", "topk"] = Field("batchtopk", description="Per-level activation.")
    tied: bool = Field(False, description="Decoder = encoder transpose.")
    unit_norm_decoder: bool = Field(True, description="Keep decoder rows at unit norm (project gradients).")
    b_dec_init: Literal["zeros", "mean", "geometric_median"] = Field("mean", description="Pre-encoder bias init.")
    normalize: Literal["l2", "center_scale", "none"] = Field("l2", description="Input normalisation.")
    l1_coeff: float = Field(0.0, ge=0, description="L1 penalty (relu_l1 architecture).")
    auxk: bool = Field(True, description="AuxK loss on dead latents (TopK family).")
    k_aux: int | None = Field(None, ge=1, description="Dead latents used by AuxK (default d_in // 2).")
    aux_coeff: float = Field(1 / 32, ge=0, description="AuxK loss coefficient.")
    dead_after: int = Field(20_000, ge=1, description="A latent is dead after this many samples without firing.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (Adam).")
    lr_end: float = Field(0.0, ge=0, description="Final learning rate of the cosine schedule.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    batch_size: int = Field(4096, ge=1, description="Samples per optimisation step.")
    epochs: float = Field(10, gt=0, description="Passes over the training split.")
    grad_clip: float | None = Field(None, gt=0, description="Global gradient-norm clip.")
    seed: int = Field(0, description="Seed of initialisation and shuffling.")
    checkpoint_every: int = execution_only(200, "Save a resumable checkpoint every N steps.", ge=1)
    device: str = execution_only("auto", "auto = cuda, then mps, then cpu.")

    @model_validator(mode="after")
    def _check_levels(self) -> SAESpec:
        if self.arch == "matryoshka":
            if not self.levels or not self.level_k or len(self.levels) != len(self.level_k):
                raise ValueError("matryoshka needs 'levels' and 'level_k' of the same length")
            if sorted(self.levels) != self.levels:
                raise ValueError("'levels' must be ascending")
            for size, k in zip(self.levels, self.level_k):
                if k > size:
                    raise ValueError(f"level budget k={k} exceeds level size {size}")
        return self

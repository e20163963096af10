"""The ``eval:`` section: which evaluations run and with what sizes."""

from __future__ import annotations

from pydantic import Field

from medsae.specbase import Section


class EvalSpec(Section):
    """Evaluation suite settings; defaults follow the study where it defines them."""

    splits: list[str] = Field(["val", "test"], description="Splits evaluated (train always used to fit probes).")
    probes: bool = Field(True, description="Fit linear probes on dense embeddings and sparse codes.")
    probe_max_train: int = Field(10_000, ge=10, description="Stratified train sub-sample for probes.")
    recovery: bool = Field(True, description="Performance-recovery curves (probes on the top-N latents).")
    recovery_ns: list[int] = Field([1, 2, 3, 5, 10, 20, 30, 50, 75, 100], description="N values of the curve.")
    recovery_max_train: int = Field(5_000, ge=10, description="Train sub-sample for recovery probes.")
    monosemanticity: bool = Field(True, description="The study's monosemanticity score.")
    retrieval: bool = Field(True, description="Fingerprint and label-based retrieval.")
    retrieval_refs: int = Field(1_000, ge=1, description="Reference slices for retrieval.")
    retrieval_ks: list[int] = Field([1, 2, 3, 5, 10, 20, 50, 100], description="Fingerprint sizes K.")
    seed: int = Field(42, description="Seed of sub-sampling.")

"""The ``eval:`` section: which evaluations run and with what sizes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from medsae.specbase import Section, execution_only, seed_field

#: Largest N of a top-N list (recovery curves, monosemanticity, retrieval fingerprints).
MAX_TOP_N = 100_000

TopN = Annotated[int, Field(ge=1, le=MAX_TOP_N)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class EvalSpec(Section):
    """Evaluation suite settings; defaults follow the study where it defines them (docs/method.md#evaluation)."""

    splits: list[Annotated[str, Field(max_length=64)]] = Field(
        ["val", "test"], max_length=16, description="Splits evaluated (train always used to fit probes)."
    )
    # -- reconstruction / sparsity
    study_batch: int = Field(2048, ge=1, le=1_048_576, description="Rows per batch of the study's R² and alive count.")
    dense_threshold: float = Field(0.1, gt=0, lt=1, description="A latent firing on more than this share is dense.")
    # -- probes
    probes: bool = Field(True, description="Fit linear probes on dense embeddings and sparse codes.")
    probe_targets: list[Literal["modality", "plane", "sex", "age_group", "institute", "pathology", "structure"]] = (
        Field(
            ["modality", "plane", "sex", "age_group", "institute", "pathology", "structure"],
            description="Probe target groups (docs/method.md#probes).",
        )
    )
    probe_structures: list[Annotated[str, Field(max_length=256)]] | None = Field(
        None, max_length=10_000, description="Structures probed (None = every structure with enough positives)."
    )
    probe_min_positives: int = Field(
        20, ge=1, le=10_000_000, description="A class (or structure) needs this many train rows to be probed."
    )
    probe_max_train: int = Field(10_000, ge=10, le=100_000_000, description="Stratified train sub-sample for probes.")
    probe_C: float = Field(1.0, gt=0, le=1e9, description="Inverse regularisation strength (study: 1).")
    probe_l1_ratio: float = Field(0.5, ge=0, le=1, description="Elastic-net mixing (study: 0.5).")
    probe_max_iter: int = Field(1000, ge=1, le=1_000_000, description="Solver iterations (study: 1000 saga epochs).")
    probe_tol: float = Field(1e-4, gt=0, le=1, description="Stop when max |Δw| <= tol · max |w|.")
    probe_backend: Literal["torch", "sklearn"] = Field(
        "torch", description="torch = batched FISTA (fast, GPU); sklearn = the study's saga (slow)."
    )
    # -- recovery
    recovery: bool = Field(True, description="Performance-recovery curves (probes on the top-N latents).")
    recovery_ns: list[TopN] = Field(
        [1, 2, 3, 5, 10, 20, 30, 50, 75, 100], max_length=256, description="N values of the curve."
    )
    recovery_max_train: int = Field(5_000, ge=10, le=100_000_000, description="Train sub-sample for recovery probes.")
    recovery_max_iter: int = Field(
        200, ge=1, le=1_000_000, description="Solver iterations of recovery probes (study: 200)."
    )
    recovery_min_dense_auc: float = Field(0.55, ge=0, le=1, description="Skip tasks whose dense val AUC is below this.")
    recovery_thresholds: list[Fraction] = Field(
        [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], max_length=256, description="Recovery levels for 'N latents to reach X %'."
    )
    mean_min_dense_auc: float = Field(
        0.6, ge=0, le=1, description="Tasks entering means and the ranking: dense AUC above this."
    )
    # -- monosemanticity
    monosemanticity: bool = Field(True, description="The study's monosemanticity score.")
    mono_top_ns: list[TopN] = Field(
        [10, 50], min_length=1, max_length=16, description="Top-N slices scored per latent (first = config score)."
    )
    mono_min_images: int = Field(10, ge=2, le=1_000_000, description="Latents with fewer top scans are not scored.")
    mono_null_draws: int = Field(100, ge=1, le=100_000, description="Random draws of the null coherence baseline.")
    # -- retrieval
    retrieval: bool = Field(True, description="Fingerprint and label-based retrieval.")
    retrieval_refs: int = Field(1_000, ge=1, le=10_000_000, description="Reference slices for retrieval.")
    retrieval_ks: list[TopN] = Field([1, 2, 3, 5, 10, 20, 50, 100], max_length=256, description="Fingerprint sizes K.")
    retrieval_top: int = Field(5, ge=1, le=10_000, description="Slices retrieved per reference (one per scan).")
    retrieval_dense_fp: bool = Field(True, description="Also run the study's dense-fingerprint baseline.")
    # -- output / execution
    plots: bool = Field(True, description="Write PNG plots into the artifact folder.")
    seed: int = seed_field(42, "Seed of sub-sampling, null draws and reference choice.")
    device: str = execution_only("auto", "Device of the probe solver and decoder: auto = cuda, else cpu.")
    threads: int | None = execution_only(
        1, "torch CPU threads of the probe solver (None = torch default; 1 avoids oversubscription).", ge=1, le=1024
    )
    chunk_rows: int = execution_only(16_384, "Rows per chunk when streaming reconstructions.", ge=1, le=1_048_576)

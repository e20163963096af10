"""The ``eval:`` section: which evaluations run, with what sizes, under which protocol.

``protocol: medsae`` (the default) is medsae's evaluation; ``protocol: study`` reproduces the study's
protocol around the same maths (docs/method.md#study-protocol): its probe groups and targets, group
coefficient tables for recovery, the study's row order and sampling, fingerprint padding. Probe
targets are configurable under either protocol (``probe_targets``: built-in medsae group names and/or
:class:`ProbeTargetDef` definitions); the study's definitions are :data:`STUDY_PROBE_TARGETS`, which
``protocol: study`` fills in when ``probe_targets`` is not given.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from medsae.specbase import Section, added_field, execution_only, seed_field

#: Largest N of a top-N list (recovery curves, monosemanticity, retrieval fingerprints).
MAX_TOP_N = 100_000

TopN = Annotated[int, Field(ge=1, le=MAX_TOP_N)]
Fraction = Annotated[float, Field(ge=0, le=1)]

#: medsae's built-in probe target groups (docs/method.md#probes).
MedsaeGroup = Literal["modality", "plane", "sex", "age_group", "institute", "pathology", "structure"]
MEDSAE_GROUPS: tuple[str, ...] = ("modality", "plane", "sex", "age_group", "institute", "pathology", "structure")
#: ``column`` of a target definition that reads the structure-presence matrix instead of a slice column.
STRUCTURE_COLUMN = "structure"


class ProbeTargetDef(Section):
    """One probe target group: a slice-table column (or structure presence) and the values probed.

    ``multiclass``: one classifier over ``classes`` (a slice's label is the class its value equals;
    slices matching none are unlabelled). ``multilabel``: one binary classifier per class (value equals
    the class, or the structure is present). Values are compared as numbers when both sides are numbers
    (``kvp`` 120 equals "120.0"), else as strings. Target names are ``group=class``.
    """

    group: str = Field(
        ..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="Group name (targets: group=class)."
    )
    kind: Literal["multiclass", "multilabel"] = Field(..., description="One classifier, or one per class.")
    column: str = Field(
        ...,
        min_length=1,
        max_length=128,
        description="Slice-table column (e.g. modality, sex, age_bin, kvp, institute, manufacturer, "
        "scanner_model, pathology, plane, slice_orientation = x/y/z) or 'structure' (structure presence).",
    )
    classes: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        ..., min_length=1, max_length=1000, description="Values probed, in order (the study's target order)."
    )

    @model_validator(mode="after")
    def _check_classes(self) -> ProbeTargetDef:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"probe target '{self.group}': classes repeat")
        if self.kind == "multiclass" and len(self.classes) < 2:
            raise ValueError(f"probe target '{self.group}': a multiclass target needs at least 2 classes")
        return self


def _target(group: str, kind: str, column: str, classes: list[str]) -> dict[str, Any]:
    return {"group": group, "kind": kind, "column": column, "classes": classes}


#: The study's 12 probe groups (40 targets) in its order (docs/method.md#study-protocol).
STUDY_PROBE_TARGETS: list[dict[str, Any]] = [
    _target("modality", "multiclass", "modality", ["mri", "ct"]),
    _target("sex", "multiclass", "sex", ["f", "m"]),
    _target("slice_orientation", "multiclass", "slice_orientation", ["x", "y", "z"]),
    _target("age_group", "multiclass", "age_bin", ["<40", ">=80"]),
    _target("kvp", "multiclass", "kvp", ["80.0", "120.0"]),
    _target("institute", "multiclass", "institute", list("ABCDEFGHIJ")),
    _target("manufacturer", "multilabel", "manufacturer", ["ge", "philips", "siemens"]),
    _target("scanner_model", "multilabel", "scanner_model", ["Achieva", "Avanto_fit", "Skyra"]),
    _target("organs_abdominal", "multilabel", "structure", ["gallbladder", "kidney_left", "liver", "spleen",
                                                            "prostate"]),
    _target("organs_head_and_neck", "multilabel", "structure", ["brain"]),
    _target("organs_thoracic", "multilabel", "structure", ["heart", "sternum", "clavicula_left", "clavicula_right"]),
    _target("pathology", "multilabel", "pathology", ["inflammation", "tumor", "trauma"]),
]  # fmt: skip


class EvalSpec(Section):
    """Evaluation suite settings; defaults follow the study where it defines them (docs/method.md#evaluation)."""

    protocol: Literal["medsae", "study"] = added_field(
        "medsae",
        description="medsae = medsae's evaluation; study = the study's protocol exactly "
        "(docs/method.md#study-protocol): its probe groups, group coefficient tables, row order, "
        "sampling, fingerprint padding, scan key = image_id.",
    )
    splits: list[Annotated[str, Field(max_length=64)]] = Field(
        ["val", "test"], max_length=16, description="Splits evaluated (train always used to fit probes)."
    )
    # -- reconstruction / sparsity
    study_batch: int = Field(2048, ge=1, le=1_048_576, description="Rows per batch of the study's R² and alive count.")
    dense_threshold: float = Field(0.1, gt=0, lt=1, description="A latent firing on more than this share is dense.")
    # -- probes
    probes: bool = Field(True, description="Fit linear probes on dense embeddings and sparse codes.")
    probe_targets: list[MedsaeGroup | ProbeTargetDef] = Field(
        list(MEDSAE_GROUPS),
        max_length=1000,
        description="Probe targets: medsae group names and/or definitions {group, kind, column, classes} "
        "(docs/method.md#probes); protocol study: definitions only, default the study's 12 groups.",
    )
    probe_structures: list[Annotated[str, Field(max_length=256)]] | None = Field(
        None,
        max_length=10_000,
        description="Structures of the 'structure' group (None = every structure with enough positives).",
    )
    probe_min_positives: int = Field(
        20,
        ge=1,
        le=10_000_000,
        description="A class (or structure) needs this many train rows to be probed (protocol medsae; the "
        "study's protocol probes every class with at least one).",
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

    @model_validator(mode="before")
    @classmethod
    def _study_targets(cls, data: Any) -> Any:
        """``protocol: study`` without ``probe_targets``: the study's groups (visible in the resolved spec)."""
        if isinstance(data, dict) and data.get("protocol") == "study" and "probe_targets" not in data:
            return {**data, "probe_targets": [dict(t) for t in STUDY_PROBE_TARGETS]}
        return data

    @field_validator("probe_targets")
    @classmethod
    def _check_targets(cls, value: list[Any], info: ValidationInfo) -> list[Any]:
        names = [t if isinstance(t, str) else t.group for t in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"probe target groups repeat: {', '.join(repeated)}")
        if info.data.get("protocol") == "study":
            builtin = [t for t in value if isinstance(t, str)]
            if builtin:
                raise ValueError(
                    f"protocol study takes target definitions {{group, kind, column, classes}}, not medsae's "
                    f"group names ({', '.join(builtin)}); leave probe_targets out for the study's groups"
                )
        return value

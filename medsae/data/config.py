"""The ``data:`` section of an experiment: where the images are, in which format, how they become slices."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from medsae.specbase import PathStr, Section, execution_only, seed_field

Plane = Literal["axial", "coronal", "sagittal"]
#: Where the scans come from (README "Bring your own data"): the TotalSegmentator layout, a manifest
#: table (one row per image) or a folder of DICOM series.
DataFormat = Literal["totalsegmentator", "manifest", "dicom"]
#: How slices are displayed: 'radiological' = one canonical orientation whatever the storage
#: (docs/method.md#orientation); 'stored' = the study's rotation of the stored array axes.
Orientation = Literal["radiological", "stored"]
#: A modality name as it appears in the slice index ('ct', 'mri', 'xr', 'pathology', ...).
ModalityName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")]

#: A phantom writes at most this many voxels over all its scans (4 Gi voxels, tens of GB on disk).
MAX_PHANTOM_VOXELS = 2**32

#: Fields that ``preset: study`` fills in where the section does not set them: the study rendered
#: slices from the stored array axes (docs/method.md#orientation); every other data default is the study's.
DATA_STUDY_PRESET: dict[str, Any] = {"orientation": "stored"}

PhantomSide = Annotated[int, Field(ge=8, le=512)]
Hounsfield = Annotated[float, Field(ge=-4096, le=4096)]
Percentile = Annotated[float, Field(ge=0, le=100)]


def modality_name(value: object) -> str:
    """The index's name of a modality: lower case, DICOM's 'MR' and 'MRI' both as 'mri'."""
    text = str(value).strip().lower()
    return "mri" if text in ("mr", "mri") else text


class PhantomSpec(Section):
    """Generate a synthetic TotalSegmentator-layout dataset at ``data.root`` if it is not there."""

    subjects: int = Field(12, ge=2, le=1000, description="Number of scans to generate (CT and MRI together).")
    seed: int = seed_field(0, "Seed of the generator; the same seed writes the same files.")
    mri_fraction: float = Field(0.34, ge=0, le=1, description="Share of subjects written as MRI scans.")
    shape: tuple[PhantomSide, PhantomSide, PhantomSide] = Field(
        (64, 64, 80),
        description="Voxel grid of a CT volume (x, y, z), each 8-512; subjects x voxels is at most 2^32.",
    )

    @model_validator(mode="after")
    def _bounded_total(self) -> PhantomSpec:
        voxels = self.subjects * self.shape[0] * self.shape[1] * self.shape[2]
        if voxels > MAX_PHANTOM_VOXELS:
            raise ValueError(
                f"subjects x shape is {voxels:,} voxels, more than the phantom limit of {MAX_PHANTOM_VOXELS:,} "
                "(lower subjects or shape)"
            )
        return self


class DataSpec(Section):
    """Slicing rules; defaults follow the study (docs/method.md#data) except the display orientation."""

    preset: Literal["none", "study"] = Field(
        "none", description="'study' = the study's slicing for every field not set explicitly (orientation: stored)."
    )
    root: PathStr = Field(
        ...,
        description="Dataset folder: TotalSegmentator's (CT_Dataset_v201/ and/or MRI_Dataset_v200/), the folder "
        "of the manifest, or a folder of DICOM series (a relative path is taken from the spec file's folder).",
    )
    format: DataFormat = Field(
        "totalsegmentator",
        description="'totalsegmentator' (the layout above), 'manifest' (a table of images, README "
        "'Bring your own data') or 'dicom' (every DICOM series under root).",
    )
    manifest: PathStr = Field(
        "manifest.csv", description="format manifest: the manifest table (.csv or .parquet), relative to root."
    )
    labels: PathStr | None = Field(
        None,
        description="format manifest: label table (.yaml or .json, relative to root) of rows whose mask is a "
        "label map and that name no table of their own.",
    )
    phantom: PhantomSpec | None = Field(None, description="If set, generate a phantom dataset at root first.")
    modalities: list[ModalityName] | None = Field(
        None, max_length=64, description="Modalities to read (e.g. [ct]); default: every modality found."
    )
    ct_planes: list[Plane] = Field(["axial", "coronal", "sagittal"], max_length=3, description="Planes sliced for CT.")
    mri_plane: Literal["thinnest", "axial", "coronal", "sagittal"] = Field(
        "thinnest",
        description="Plane of MRI and other non-CT volumes: 'thinnest' = the axis with the fewest voxels (study).",
    )
    orientation: Orientation = Field(
        "radiological",
        description="Slice display: 'radiological' = every volume reoriented to RAS and shown in radiological "
        "convention, whatever its storage; 'stored' = the study's rotation of the stored axes.",
    )
    reorient: bool | None = Field(
        None,
        description="Reorient volumes to the closest RAS orientation before slicing (default: yes for "
        "orientation radiological, which needs it; no for stored).",
    )
    stride: int = Field(1, ge=1, le=1024, description="Keep every stride-th slice along each axis.")
    size: int = Field(
        1024, ge=16, le=4096, description="Side of the square slice image (pixels) after crop and resize."
    )
    crop: Literal["center_square", "none"] = Field(
        "center_square", description="In-plane crop before resizing ('none' pads the slice to a square)."
    )
    resize: Literal["lanczos", "bilinear", "nearest"] = Field(
        "lanczos", description="Resampling from the crop to `size` (lanczos = the study's PIL resize)."
    )
    ct_default_window: tuple[Hounsfield, Annotated[float, Field(gt=0, le=8192)]] = Field(
        (40.0, 400.0), description="(centre, width) in HU for study types missing from the table."
    )
    ct_scaling: Literal["volume", "window"] = Field(
        "volume",
        description="After clipping to the window, rescale by the clipped volume's min/max (study) "
        "or by the window limits.",
    )
    mri_percentiles: tuple[Percentile, Percentile] = Field(
        (1.0, 99.0), description="MRI clip percentiles over voxels > 0 (low < high, each 0-100)."
    )
    resample_mri: bool = Field(True, description="Resample anisotropic MRI in-plane to the finer spacing.")
    presence_threshold: int = Field(0, ge=0, le=4096 * 4096, description="A structure is present when pixels > this.")
    anatomy_filter: bool = Field(
        True,
        description="Keep the contiguous slice range containing any structure (scans without masks keep every slice).",
    )
    test_institutes: list[Annotated[str, Field(max_length=64)]] = Field(
        ["A", "D", "E"], max_length=256, description="Institutes held out as the test split."
    )
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of non-test scans in the val split.")
    split_seed: int = seed_field(42, "Seed of the stratified train/val split.")
    split_file: PathStr | None = Field(
        None,
        description="Split table (parquet) shared by every experiment on this dataset (a relative path is "
        "taken from the spec file's folder); default <root>/.medsae/splits/<split-params-hash>.parquet.",
    )
    max_scans: int | None = Field(None, ge=1, le=10_000_000, description="Read at most this many scans (quick runs).")
    workers: int = execution_only(1, "Processes used for ingest.", ge=1, le=256)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") == "study":
            return {**DATA_STUDY_PRESET, **data}
        return data

    @field_validator("root")
    @classmethod
    def _normal_root(cls, v: str) -> str:
        # 'data/x/', './data/x' and 'data/x' name one folder: one stage key (`medsae data ingest` vs a spec)
        return os.path.normpath(v)

    @field_validator("modalities")
    @classmethod
    def _modality_names(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else list(dict.fromkeys(modality_name(m) for m in v))

    @model_validator(mode="after")
    def _consistent(self) -> DataSpec:
        low, high = self.mri_percentiles
        if not low < high:
            raise ValueError(f"mri_percentiles: the low percentile ({low}) must be below the high one ({high})")
        if self.orientation == "radiological" and self.reorient is False:
            raise ValueError(
                "reorient: false needs orientation: stored (the radiological display reorients every volume)"
            )
        if self.phantom is not None and self.format != "totalsegmentator":
            raise ValueError(f"phantom: writes the TotalSegmentator layout, but format is '{self.format}'")
        return self

    @property
    def reoriented(self) -> bool:
        """Whether volumes are brought to the closest RAS orientation before slicing."""
        return self.orientation == "radiological" if self.reorient is None else self.reorient

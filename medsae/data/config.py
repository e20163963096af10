"""The ``data:`` section of an experiment: where the volumes are and how they become slices."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from medsae.specbase import PathStr, Section, execution_only, seed_field

Plane = Literal["axial", "coronal", "sagittal"]

#: A phantom writes at most this many voxels over all its scans (4 Gi voxels, tens of GB on disk).
MAX_PHANTOM_VOXELS = 2**32

PhantomSide = Annotated[int, Field(ge=8, le=512)]
Hounsfield = Annotated[float, Field(ge=-4096, le=4096)]
Percentile = Annotated[float, Field(ge=0, le=100)]


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
    """Slicing rules; defaults follow the study (docs/method.md#data)."""

    root: PathStr = Field(
        ...,
        description="TotalSegmentator folder holding CT_Dataset_v201/ and/or MRI_Dataset_v200/ "
        "(a relative path is taken from the spec file's folder).",
    )
    phantom: PhantomSpec | None = Field(None, description="If set, generate a phantom dataset at root first.")
    modalities: list[Literal["ct", "mri"]] = Field(
        ["ct", "mri"], max_length=2, description="Which sub-datasets to read."
    )
    ct_planes: list[Plane] = Field(["axial", "coronal", "sagittal"], max_length=3, description="Planes sliced for CT.")
    mri_plane: Literal["thinnest", "axial", "coronal", "sagittal"] = Field(
        "thinnest", description="MRI plane: 'thinnest' = the axis with the fewest voxels (study)."
    )
    reorient: bool = Field(False, description="Reorient volumes to the closest RAS orientation before slicing.")
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
    anatomy_filter: bool = Field(True, description="Keep the contiguous slice range containing any structure.")
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

    @model_validator(mode="after")
    def _ordered_percentiles(self) -> DataSpec:
        low, high = self.mri_percentiles
        if not low < high:
            raise ValueError(f"mri_percentiles: the low percentile ({low}) must be below the high one ({high})")
        return self

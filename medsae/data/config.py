"""The ``data:`` section of an experiment: where the volumes are and how they become slices."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medsae.specbase import Section, execution_only

Plane = Literal["axial", "coronal", "sagittal"]


class PhantomSpec(Section):
    """Generate a synthetic TotalSegmentator-layout dataset at ``data.root`` if it is not there."""

    subjects: int = Field(12, ge=2, description="Number of scans to generate (CT and MRI together).")
    seed: int = Field(0, description="Seed of the generator; the same seed writes the same files.")
    mri_fraction: float = Field(0.34, ge=0, le=1, description="Share of subjects written as MRI scans.")
    shape: tuple[int, int, int] = Field((64, 64, 80), description="Voxel grid of a CT volume (x, y, z).")


class DataSpec(Section):
    """Slicing rules; defaults follow the study (study-method.md section 1 and 3)."""

    root: str = Field(
        ..., description="TotalSegmentator folder holding CT_Dataset_v201/ and/or MRI_Dataset_v200/."
    )
    phantom: PhantomSpec | None = Field(None, description="If set, generate a phantom dataset at root first.")
    modalities: list[Literal["ct", "mri"]] = Field(["ct", "mri"], description="Which sub-datasets to read.")
    ct_planes: list[Plane] = Field(["axial", "coronal", "sagittal"], description="Planes sliced for CT.")
    mri_plane: Literal["thinnest", "axial", "coronal", "sagittal"] = Field(
        "thinnest", description="MRI plane: 'thinnest' = the axis with the fewest voxels (study)."
    )
    reorient: bool = Field(
        False, description="Reorient volumes to the closest RAS orientation before slicing."
    )
    stride: int = Field(1, ge=1, description="Keep every stride-th slice along each axis.")
    size: int = Field(
        1024, ge=16, description="Side of the square slice image (pixels) after crop and resize."
    )
    crop: Literal["center_square", "none"] = Field(
        "center_square", description="In-plane crop before resizing ('none' pads the slice to a square)."
    )
    resize: Literal["lanczos", "bilinear", "nearest"] = Field(
        "lanczos", description="Resampling from the crop to `size` (lanczos = the study's PIL resize)."
    )
    ct_default_window: tuple[float, float] = Field(
        (40.0, 400.0), description="(centre, width) in HU for study types missing from the table."
    )
    ct_scaling: Literal["volume", "window"] = Field(
        "volume",
        description="After clipping to the window, rescale by the clipped volume's min/max (study) "
        "or by the window limits.",
    )
    mri_percentiles: tuple[float, float] = Field(
        (1.0, 99.0), description="MRI clip percentiles over voxels > 0."
    )
    resample_mri: bool = Field(True, description="Resample anisotropic MRI in-plane to the finer spacing.")
    presence_threshold: int = Field(0, ge=0, description="A structure is present when pixels > this.")
    anatomy_filter: bool = Field(
        True, description="Keep the contiguous slice range containing any structure."
    )
    test_institutes: list[str] = Field(["A", "D", "E"], description="Institutes held out as the test split.")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of non-test scans in the val split.")
    split_seed: int = Field(42, description="Seed of the stratified train/val split.")
    split_file: str | None = Field(
        None,
        description="Split table (parquet) shared by every experiment on this dataset; default "
        "<root>/.medsae/splits/<split-params-hash>.parquet.",
    )
    max_scans: int | None = Field(None, ge=1, description="Read at most this many scans (quick runs).")
    workers: int = execution_only(1, "Processes used for ingest.", ge=1)

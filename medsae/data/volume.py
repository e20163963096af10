"""Loading a volume and bringing it (and its masks) onto the grid that slices are taken from.

``prepare`` is the one place that decides a scan's slicing grid; ingest (mask areas) and
rendering (images) both call it, so a slice index means the same pixels in both:

1. reorientation to the closest RAS orientation (``SliceOptions.reorient``; always for the
   radiological display, docs/method.md#orientation);
2. the slicing axes: CT every requested plane, MRI (and any other 3-D modality) the axis with the
   fewest voxels (study) or a named plane; plane names come from the affine, so LPS, RAS or
   permuted storage all name axial / coronal / sagittal correctly;
3. non-CT only: when the two in-plane spacings differ by more than 1e-3 mm, linear resampling of
   the image (nearest for masks) to the finer in-plane spacing (docs/method.md#mri-slices).

2-D images take :func:`prepare_flat` instead: one slice, no planes, no reorientation.
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation

from medsae.data.slicing import (
    inplane_axes,
    mask_to_grid,
    planes_of,
    reorient_to_ras,
    resample_axes,
    spacing_of,
)

if TYPE_CHECKING:
    from medsae.data.config import DataSpec


class ScanError(Exception):
    """A scan cannot be indexed (unreadable volume, bad mask...); the message is the skip reason."""


@dataclass(frozen=True)
class SliceOptions:
    """The slicing and rendering rules taken from the data section (see DataSpec)."""

    modalities: tuple[str, ...] = ()  # empty: every modality found
    ct_planes: tuple[str, ...] = ("axial", "coronal", "sagittal")
    mri_plane: str = "thinnest"
    orientation: str = "radiological"  # display convention (medsae.data.orientation)
    reorient: bool = True  # to the closest RAS orientation before slicing (radiological needs it)
    stride: int = 1
    size: int = 1024
    crop: str = "center_square"
    resize: str = "lanczos"
    ct_default_window: tuple[float, float] = (40.0, 400.0)
    ct_scaling: str = "volume"
    mri_percentiles: tuple[float, float] = (1.0, 99.0)
    resample_mri: bool = True
    presence_threshold: int = 0
    anatomy_filter: bool = True

    @classmethod
    def from_spec(cls, data: DataSpec) -> SliceOptions:
        """The options of a ``data:`` section."""
        return cls(
            modalities=tuple(data.modalities or ()),
            ct_planes=tuple(data.ct_planes),
            mri_plane=data.mri_plane,
            orientation=data.orientation,
            reorient=data.reoriented,
            stride=data.stride,
            size=data.size,
            crop=data.crop,
            resize=data.resize,
            ct_default_window=data.ct_default_window,
            ct_scaling=data.ct_scaling,
            mri_percentiles=data.mri_percentiles,
            resample_mri=data.resample_mri,
            presence_threshold=data.presence_threshold,
            anatomy_filter=data.anatomy_filter,
        )

    @classmethod
    def from_json(cls, stored: dict[str, Any]) -> SliceOptions:
        """Options as :meth:`to_json` stored them (``render.json``); lists become tuples.

        Artifacts written before the display orientation was an option were rendered the study's way.
        """
        values: dict[str, Any] = {"orientation": "stored", "reorient": False}
        for f in fields(cls):
            if stored.get(f.name) is not None:
                v = stored[f.name]
                values[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Prepared:
    """A volume on its slicing grid, and how it got there (so masks can follow)."""

    array: np.ndarray  # float32, prepared grid
    source_shape: tuple[int, int, int]  # as stored on disk
    source_affine: np.ndarray  # as stored on disk
    affine: np.ndarray  # of the prepared grid, before any MRI resampling
    ornt: np.ndarray | None  # reorientation applied (None = stored axes)
    planes: tuple[str | None, str | None, str | None]  # plane of slicing along each prepared axis (None: 2-D)
    axes: tuple[int, ...]  # prepared axes that are sliced
    spacing: np.ndarray  # voxel size per prepared axis before resampling
    resample_axes: tuple[int, ...] = ()
    resample_target: float | None = None


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float | None, float | None]]:
    """Stored array, affine and (slope, intercept) of a single-file NIfTI-1 (``.nii`` / ``.nii.gz``).

    A fast path for the many small mask files: one read, one decompression, the header parsed
    without nibabel's format sniffing and header checks (about 10x less overhead per file). The
    array is a read-only view in the stored dtype. Anything else (NIfTI-2, odd files) goes
    through ``nibabel.load``.
    """
    try:
        raw = path.read_bytes()
        # zlib checks the gzip CRC and length itself; a multi-member file fails the size check below
        data = zlib.decompress(raw, wbits=31) if path.name.endswith(".gz") else raw
        del raw
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(data[:352]), check=False)
        if header["sizeof_hdr"] != 348 or header["magic"] != b"n+1":
            raise ValueError("not a single-file NIfTI-1")
        shape = header.get_data_shape()
        dtype = header.get_data_dtype()
        count = int(np.prod(shape))
        offset = int(header.get_data_offset())
        if offset + count * dtype.itemsize > len(data):
            raise ValueError("data shorter than the header says")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
        return array, header.get_best_affine(), header.get_slope_inter()
    except Exception:
        img = nib.load(str(path))
        return np.asanyarray(img.dataobj), img.affine, (None, None)  # dataobj applies any scaling


def _squeeze_3d(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4 and array.shape[3] == 1:
        return array[..., 0]
    return array


def load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D NIfTI as float32 (scaling applied) and its affine; problems raise :class:`ScanError`."""
    try:
        stored, affine, (slope, inter) = read_nifti(path)
        stored = _squeeze_3d(stored)
        if stored.ndim != 3:
            raise ScanError(f"volume is not 3-D (shape {tuple(stored.shape)})")
        array = stored.astype(np.float32)
        if slope is not None and slope != 1:
            array *= np.float32(slope)
        if inter:
            array += np.float32(inter)
        return array, affine
    except ScanError:
        raise
    except Exception as exc:  # truncated gzip, bad header, ...: one line naming the problem
        raise ScanError(f"cannot read volume {path.name}: {_one_line(exc)}") from None


def load_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A mask's stored array (no float conversion; nonzero = inside) and affine."""
    try:
        stored, affine, _ = read_nifti(path)
        return _squeeze_3d(stored), affine
    except Exception as exc:
        raise ScanError(f"cannot read mask {path.name}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def prepare(array: np.ndarray, affine: np.ndarray, modality: str, opts: SliceOptions) -> Prepared:
    """Reorient (optional), choose slicing axes, resample anisotropic MRI in-plane (optional)."""
    source_shape, source_affine = tuple(array.shape), affine
    ornt = None
    if opts.reorient:
        ornt = io_orientation(affine)
        array, affine = reorient_to_ras(array, affine)
    try:
        planes = planes_of(affine)
    except ValueError as exc:
        raise ScanError(str(exc)) from None
    spacing = spacing_of(affine)
    if modality == "ct":
        axes = tuple(sorted(planes.index(p) for p in opts.ct_planes))
    elif opts.mri_plane == "thinnest":
        axes = (int(np.argmin(array.shape)),)
    else:
        axes = (planes.index(opts.mri_plane),)
    prep = Prepared(array, source_shape, source_affine, affine, ornt, planes, axes, spacing)
    if modality != "ct" and opts.resample_mri:
        b, c = inplane_axes(axes[0])
        if abs(spacing[b] - spacing[c]) > 1e-3:
            prep.resample_axes = (b, c)
            prep.resample_target = float(min(spacing[b], spacing[c]))
            prep.array = resample_axes(array, spacing, (b, c), prep.resample_target, order=1)
    return prep


def prepare_flat(array: np.ndarray) -> Prepared:
    """A 2-D image ``[1, rows, cols]`` as its own slicing grid: one slice along axis 0, no plane."""
    affine = np.eye(4)
    return Prepared(array, tuple(array.shape), affine, affine, None, (None, None, None), (0,), np.ones(3))


def prepare_mask(
    name: str, mask: np.ndarray, mask_affine: np.ndarray, prep: Prepared, keep_labels: bool = False
) -> np.ndarray:
    """A mask as a boolean array on the prepared grid of its image (``keep_labels``: its label values).

    A mask stored on another grid that covers the same field of view is resampled
    nearest-neighbour; one that does not (or is not 3-D) raises :class:`ScanError`.
    """
    if mask.ndim != 3:
        raise ScanError(f"mask {name} is not 3-D (shape {tuple(mask.shape)})")
    if tuple(mask.shape) != prep.source_shape:
        moved = mask_to_grid(mask, mask_affine, prep.source_shape, prep.source_affine)
        if moved is None:
            raise ScanError(
                f"mask {name} has shape {tuple(mask.shape)}, image has {prep.source_shape}, "
                "and its grid does not cover the image"
            )
        mask = moved
    out = mask if keep_labels else mask != 0
    if prep.ornt is not None:
        out = apply_orientation(out, prep.ornt)
    if prep.resample_axes:
        out = resample_axes(out, prep.spacing, prep.resample_axes, prep.resample_target, order=0)
    return out

"""Reading any scan's pixels and masks: NIfTI volumes, DICOM series, 2-D images.

A scan names its reader (``ScanTask.reader``, recorded per scan in ``scans.parquet`` so rendering
reads it the same way):

* ``nifti`` — a 3-D ``.nii`` / ``.nii.gz`` volume (:func:`medsae.data.volume.load_volume`);
* ``dicom`` — a DICOM series, its files in slice order (:func:`medsae.data.dicom.load_series`);
* ``dicom2d`` — a single-image DICOM series (a radiograph), a 2-D picture;
* ``image2d`` — a PNG, JPEG or TIFF picture (:mod:`medsae.data.images2d`).

Volumes come back as float32 with their RAS affine; 2-D pictures as ``[1, rows, cols]`` in their
stored depth (their windowing depends on it) with an identity affine. Masks are NIfTI files or
2-D images; a mask file may hold one structure (non-zero = inside) or a label map.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medsae.data.images2d import IMAGE_SUFFIXES, is_image_file, read_image, read_mask
from medsae.data.volume import ScanError, load_mask, load_volume

READERS = ("nifti", "dicom", "dicom2d", "image2d")
FLAT_READERS = frozenset({"dicom2d", "image2d"})
NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: files a mask folder may hold (lossy JPEG is no mask format)
MASK_SUFFIXES = (*NIFTI_SUFFIXES, ".png", ".tif", ".tiff")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_suffix(name: str) -> str:
    """A file name without its image suffix ('liver.nii.gz' -> 'liver')."""
    low = name.lower()
    for suffix in (*NIFTI_SUFFIXES, *IMAGE_SUFFIXES, ".dcm"):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_scan(root: Path, reader: str, volume: str, files: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """A scan's pixels and affine (see module docstring); problems raise :class:`ScanError`."""
    if reader == "nifti":
        return load_volume(root / volume)
    if reader == "dicom":
        from medsae.data.dicom import load_series

        return load_series(root, list(files))
    if reader == "dicom2d":
        from medsae.data.dicom import load_flat

        return load_flat(root, files[0] if files else volume), np.eye(4)
    if reader == "image2d":
        return read_image(root / volume), np.eye(4)
    raise ScanError(f"unknown reader {reader!r} (known: {', '.join(READERS)})")


def load_mask_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A mask or label map (NIfTI or 2-D image) as stored values and affine."""
    if is_image_file(path):
        return read_mask(path)
    return load_mask(path)

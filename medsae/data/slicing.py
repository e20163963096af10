"""Geometry of slicing: plane names, reorientation, crops, display orientation, resizing, resampling.

All functions are pure array maths (numpy, PIL for Lanczos) shared by ingest (which counts mask
pixels) and rendering (which makes the images the embed stage sees), so both agree on which
pixels a slice holds.

Conventions (docs/method.md#slice-geometry): a slice along stored array axis ``a`` is ``vol.take(i, axis=a)``, a 2-D
array whose rows and columns are the two remaining axes in increasing order. The in-plane crop is
the central square (side = the smaller in-plane dimension, start = (dim - side) // 2). Display:
rotate 90° counter-clockwise, then mirror left-right for slices along axes 0 and 1.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff, io_orientation

PLANE_OF_CODE = {"L": "sagittal", "R": "sagittal", "A": "coronal", "P": "coronal", "S": "axial", "I": "axial"}


def axis_codes(affine: np.ndarray) -> tuple[str, str, str]:
    """World direction (RAS letters) each stored axis points to, e.g. ('L', 'P', 'S')."""
    codes = aff2axcodes(affine)
    if any(c is None for c in codes):
        raise ValueError("affine has a degenerate axis")
    return tuple(codes)


def planes_of(affine: np.ndarray) -> tuple[str, str, str]:
    """Plane obtained by slicing along each stored axis.

    Slicing along the axis that points left/right gives a sagittal image, anterior/posterior a
    coronal one, superior/inferior an axial one — whatever the storage order (LPS, RAS, PIR ...).
    """
    return tuple(PLANE_OF_CODE[c] for c in axis_codes(affine))


def reorient_to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip the array to the closest RAS orientation; returns (array, new affine)."""
    ornt = io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return array, affine
    out = apply_orientation(array, ornt)
    return out, affine @ inv_ornt_aff(ornt, array.shape)


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each stored axis (mm)."""
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def inplane_axes(axis: int) -> tuple[int, int]:
    """The two stored axes spanning a slice taken along ``axis`` (rows, columns)."""
    return tuple(a for a in range(3) if a != axis)


def crop_bounds(rows: int, cols: int, mode: str = "center_square") -> tuple[slice, slice]:
    """In-plane crop of a rows x cols slice: the central square, or everything (mode 'none')."""
    if mode == "none":
        return slice(0, rows), slice(0, cols)
    side = min(rows, cols)
    r0, c0 = (rows - side) // 2, (cols - side) // 2
    return slice(r0, r0 + side), slice(c0, c0 + side)


def volume_crop(shape: tuple[int, ...], axis: int, mode: str = "center_square") -> tuple[slice, slice, slice]:
    """The 3-D index that keeps the in-plane crop of every slice along ``axis``."""
    b, c = inplane_axes(axis)
    sb, sc = crop_bounds(shape[b], shape[c], mode)
    index = [slice(None)] * 3
    index[b], index[c] = sb, sc
    return tuple(index)


def take_slices(volume: np.ndarray, axis: int, idx: np.ndarray, crop: str = "center_square") -> np.ndarray:
    """Cropped slices ``[n, rows, cols]`` of a volume along ``axis`` at indices ``idx``."""
    cropped = volume[volume_crop(volume.shape, axis, crop)]
    # fancy indexing on a view gathers only the wanted slices; ``take`` would first copy the whole
    # volume into C order (NIfTI and DICOM volumes are read in Fortran order)
    return np.moveaxis(cropped, axis, 0)[np.asarray(idx, dtype=np.intp)]


def pad_square(images: np.ndarray) -> np.ndarray:
    """Zero-pad ``[n, h, w]`` images symmetrically to squares (used when crop = 'none')."""
    n, h, w = images.shape
    side = max(h, w)
    if h == w:
        return images
    out = np.zeros((n, side, side), dtype=images.dtype)
    r0, c0 = (side - h) // 2, (side - w) // 2
    out[:, r0 : r0 + h, c0 : c0 + w] = images
    return out


def resize_images(images: np.ndarray, size: int, method: str = "lanczos") -> np.ndarray:
    """Resize square uint8 images ``[n, s, s]`` to ``[n, size, size]`` with PIL.

    'lanczos' is the study's resampling; 'bilinear' (antialiased when shrinking) and 'nearest' are
    cheaper alternatives. Images already at ``size`` are returned unchanged.
    """
    n, h, w = images.shape
    if h == size and w == size:
        return images
    from PIL import Image

    resample = {
        "lanczos": Image.Resampling.LANCZOS,
        "bilinear": Image.Resampling.BILINEAR,
        "nearest": Image.Resampling.NEAREST,
    }[method]
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        out[i] = np.asarray(Image.fromarray(images[i]).resize((size, size), resample))
    return out


def to_display(images: np.ndarray, axis: int) -> np.ndarray:
    """The study's display orientation: rotate 90° CCW; slices along axes 0 and 1 also mirror L-R."""
    out = np.rot90(images, k=1, axes=(1, 2))
    if axis in (0, 1):
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


def resample_axes(
    array: np.ndarray, spacing: np.ndarray, axes: tuple[int, ...], target: float, order: int
) -> np.ndarray:
    """Resample ``array`` along ``axes`` to voxel size ``target`` (linear ``order=1`` or nearest ``0``).

    Output size per axis is ``round(n * spacing / target)``; sample ``k`` sits at input coordinate
    ``k * target / spacing`` (same origin, as SimpleITK's resampler with the input origin).
    """
    out = array
    for ax in axes:
        n = out.shape[ax]
        ratio = target / float(spacing[ax])
        if abs(ratio - 1.0) < 1e-6:
            continue
        m = max(1, int(round(n / ratio)))
        coords = np.arange(m) * ratio
        if order == 0:
            idx = np.clip(np.rint(coords).astype(np.intp), 0, n - 1)
            out = out.take(idx, axis=ax)
            continue
        coords = np.clip(coords, 0, n - 1)
        i0 = np.floor(coords).astype(np.intp)
        i1 = np.minimum(i0 + 1, n - 1)
        w = (coords - i0).astype(np.float32)
        shape = [1, 1, 1]
        shape[ax] = m
        w = w.reshape(shape)
        out = out.take(i0, axis=ax).astype(np.float32) * (1 - w) + out.take(i1, axis=ax).astype(np.float32) * w
    return out


def grid_map(
    mask_shape: tuple[int, ...], mask_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """How a mask grid maps onto an image grid: (mask axis per image axis, mask index per image voxel).

    None when the grids are not axis-aligned to each other or do not cover the same field of view
    within one coarse voxel. Needs only shapes and affines, so headers alone can be checked.
    """
    vox = np.linalg.solve(mask_affine, affine)  # image voxel -> mask voxel
    lin = vox[:3, :3]
    perm = np.argmax(np.abs(lin), axis=0)  # mask axis for each image axis
    if sorted(perm.tolist()) != [0, 1, 2]:
        return None
    off = lin.copy()
    off[perm, [0, 1, 2]] = 0
    if np.abs(off).max() > 1e-3 * np.abs(lin).max():
        return None
    # field of view check: image voxel-corner extents mapped into the mask grid
    for i in range(3):
        p = perm[i]
        scale, shift = lin[p, i], vox[p, 3]
        ends = sorted([shift + scale * -0.5, shift + scale * (shape[i] - 0.5)])
        tol = max(1.0, abs(scale))
        if abs(ends[0] + 0.5) > tol or abs(ends[1] - (mask_shape[p] - 0.5)) > tol:
            return None
    index = []
    for i in range(3):
        p = perm[i]
        k = np.rint(vox[p, 3] + lin[p, i] * np.arange(shape[i])).astype(np.intp)
        index.append(np.clip(k, 0, mask_shape[p] - 1))
    return perm, index


def mask_to_grid(
    mask: np.ndarray, mask_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray
) -> np.ndarray | None:
    """A mask on another voxel grid, resampled nearest-neighbour onto the image grid.

    Works when the two grids are axis-aligned to each other (permutations, flips, different voxel
    sizes, shifted origins) and cover the same field of view within one coarse voxel. Returns None
    when they do not (the caller records the mask as having the wrong shape).
    """
    mapped = grid_map(mask.shape, mask_affine, shape, affine)
    if mapped is None:
        return None
    perm, index = mapped
    moved = np.transpose(mask, perm)
    return moved[np.ix_(*index)]

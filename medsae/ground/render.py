"""Slices and their structure masks, rendered again from the volumes for the slices being grounded.

Pixels are never stored, and grounding needs only the top slices of each latent, so both the
images (exactly as the embed stage saw them, :mod:`medsae.data.render`) and the masks of the
structures present in them are made here from the volume and its ``segmentations/`` files. A
mask takes the image's path through the slicing code: ``prepare_mask`` onto the slicing grid,
the same crop and display orientation, then an area-weighted resize (bilinear with antialiasing,
a pixel is inside when at least half of it is) to the scoring grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medsae.data.intensity import IntensityMap
from medsae.data.render import RenderIndex, render_from_volume, render_index
from medsae.data.slicing import pad_square, resize_images, take_slices, to_display
from medsae.data.totalsegmentator import MASK_SUFFIX
from medsae.data.volume import ScanError, load_mask, load_volume, prepare, prepare_mask
from medsae.errors import MedsaeError


@dataclass
class RenderedScan:
    """The requested slices of one scan: images for the backbone, masks on the scoring grid."""

    slice_ids: np.ndarray  # int64 [n], sorted
    images: np.ndarray  # uint8 [n, size, size], as the embed stage rendered them
    masks: list[dict[str, np.ndarray]]  # per slice: structure -> bool [score_size, score_size]


def mask_path(index: RenderIndex, scan_row: int, structure: str) -> Path:
    """The mask file of ``structure`` next to a scan's volume (TotalSegmentator layout)."""
    volume = Path(index.scans.iloc[int(scan_row)]["volume"])
    return index.root / volume.parent / "segmentations" / f"{structure}{MASK_SUFFIX}"


def _mask_slices(mask: np.ndarray, axis: int, idx: np.ndarray, crop: str, size: int) -> np.ndarray:
    """bool [n, size, size] slices of a 3-D boolean mask, through the image's crop and orientation."""
    images = take_slices(mask.view(np.uint8) * np.uint8(255), axis, idx, crop)
    if crop == "none":
        images = pad_square(images)
    return resize_images(to_display(images, axis), size, "bilinear") >= 128


def render_scan(
    index: RenderIndex,
    scan_row: int,
    slice_ids: np.ndarray,
    structures: list[list[str]],
    score_size: int,
) -> RenderedScan:
    """Images and masks of ``slice_ids`` (one scan; ``structures[i]`` = the structures to render for slice i)."""
    row = index.scans.iloc[int(scan_row)]
    path = index.root / row["volume"]
    try:
        array, affine = load_volume(path)
        prep = prepare(array, affine, row["modality"], index.options)
    except ScanError as exc:
        raise MedsaeError(f"{path}: cannot render slices for grounding: {exc}") from None
    del array
    imap = IntensityMap(row["clip_lo"], row["clip_hi"], row["out_lo"], row["out_hi"])
    u8 = imap.apply(prep.array)
    prep.array = np.empty(0, dtype=np.float32)
    opts = index.options
    axes, idx = index.axis[slice_ids], index.idx[slice_ids]
    images = np.empty((len(slice_ids), opts.size, opts.size), dtype=np.uint8)
    for axis in np.unique(axes):
        sel = np.flatnonzero(axes == axis)
        images[sel] = render_from_volume(u8, int(axis), idx[sel], opts, opts.size)
    del u8
    masks: list[dict[str, np.ndarray]] = [{} for _ in slice_ids]
    for name in sorted({s for names in structures for s in names}):
        file = mask_path(index, scan_row, name)
        try:
            raw, mask_affine = load_mask(file)
            mask = prepare_mask(name, raw, mask_affine, prep)
        except ScanError as exc:
            raise MedsaeError(f"{file}: cannot render the mask for grounding: {exc}") from None
        wanted = np.asarray([name in names for names in structures])
        for axis in np.unique(axes[wanted]):
            sel = np.flatnonzero(wanted & (axes == axis))
            for i, m in zip(sel, _mask_slices(mask, int(axis), idx[sel], opts.crop, score_size), strict=True):
                masks[i][name] = m
    return RenderedScan(np.asarray(slice_ids, dtype=np.int64), images, masks)


def iter_rendered(
    slices_dir: str | Path, slice_ids: np.ndarray, structures: pd.DataFrame, score_size: int
) -> Iterator[RenderedScan]:
    """:func:`render_scan` for every scan among ``slice_ids`` (one volume read per scan).

    ``structures`` is the long table ``slice_id, structure, pixels`` of the slices artifact: a
    slice's masks are those of the structures with pixels in it.
    """
    index = render_index(slices_dir)
    ids = np.unique(np.asarray(slice_ids, dtype=np.int64))
    present = structures[structures["slice_id"].isin(ids)]
    names_of = present.groupby("slice_id")["structure"].agg(list).to_dict()
    scans = index.scan_of_slice[ids]
    for scan in np.unique(scans):
        group = ids[scans == scan]
        yield render_scan(index, int(scan), group, [names_of.get(int(s), []) for s in group], score_size)

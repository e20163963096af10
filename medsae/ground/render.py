"""Slices and their structure masks, rendered again from the volumes for the slices being grounded.

Pixels are never stored, and grounding needs only the top slices of each latent, so both the
images and the masks of the structures present in them are made here, by the data package's own
rendering: images exactly as the embed stage saw them (:func:`medsae.data.render.render_scan_images`),
masks through the same reader, grid, crop and display orientation (``data.orientation``) for every
source the ingest reads: TotalSegmentator layout, manifests with mask folders or label maps, DICOM
series, 2-D images (:func:`medsae.data.masks.render_masks`). Masks are area-resized to the scoring
grid (a pixel is inside when at least half of it is).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medsae.data.masks import render_masks
from medsae.data.render import RenderIndex, render_index, render_scan_images


@dataclass
class RenderedScan:
    """The requested slices of one scan: images for the backbone, masks on the scoring grid."""

    slice_ids: np.ndarray  # int64 [n], sorted
    images: np.ndarray  # uint8 [n, size, size], as the embed stage rendered them
    masks: list[dict[str, np.ndarray]]  # per slice: structure -> bool [score_size, score_size]


def render_scan(
    index: RenderIndex,
    scan_row: int,
    slice_ids: np.ndarray,
    structures: list[list[str]],
    score_size: int,
) -> RenderedScan:
    """Images and masks of ``slice_ids`` (one scan; ``structures[i]`` = the structures to render for slice i)."""
    ids = np.asarray(slice_ids, dtype=np.int64)
    images = render_scan_images(index, scan_row, ids, index.options.size)
    masks = render_masks(index, scan_row, ids, structures, score_size)
    return RenderedScan(ids, images, masks)


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

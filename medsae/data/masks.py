"""Structure masks of rendered slices, on the pixels the slice image shows.

A mask follows its image through the same steps (:mod:`medsae.data.render`): read with the
ingest's reader, :func:`prepare_mask` onto the scan's slicing grid (the volume's reorientation and
resampling, :func:`medsae.data.render.scan_grid`), then the slice is taken, cropped, turned upright
in the data's display orientation (``data.orientation``; 2-D images as stored) and resized by
:func:`medsae.data.render.render_from_volume`. Only the resampling differs: a mask is resized
bilinear with antialiasing and a pixel is inside when at least half of it is, so at the crop's
own size a mask keeps exactly the pixels the ingest counted (``slice_structures.pixels``).

Masks are found where the ingest found them, recorded per scan in ``scans.parquet``: one file per
structure (TotalSegmentator layout, a manifest's mask folder) or one label map with its label
table (a structure is every voxel holding one of its values, as :func:`label_areas` counts).
Slices artifacts written before that record hold TotalSegmentator-layout masks beside the volume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsae.data.labelmap import structure_mask
from medsae.data.readers import load_mask_file
from medsae.data.render import RenderIndex, ScanGrid, render_from_volume, scan_grid
from medsae.data.totalsegmentator import MASK_SUFFIX
from medsae.data.volume import ScanError, prepare_mask
from medsae.errors import MedsaeError

#: how a mask is resampled to the requested size before it is thresholded at half a pixel
MASK_RESIZE = "bilinear"


@dataclass(frozen=True)
class MaskSources:
    """Where one scan's structure masks are (paths relative to the dataset root)."""

    files: dict[str, str] = field(default_factory=dict)  # structure -> mask file
    label_map: str | None = None
    labels: dict[str, list[int]] = field(default_factory=dict)  # structure -> label values
    legacy_folder: str | None = None  # old artifacts: '<volume folder>/segmentations'

    def file_of(self, structure: str) -> str | None:
        """The mask file of ``structure`` (None: it is in the label map, or the scan has no mask for it)."""
        if self.legacy_folder is not None:
            return f"{self.legacy_folder}/{structure}{MASK_SUFFIX}"
        return self.files.get(structure)


def mask_sources(index: RenderIndex, scan_row: int) -> MaskSources:
    """The mask files or the label map the ingest read for a scan (``scans.parquet``)."""
    row = index.scans.iloc[int(scan_row)]
    if "masks" not in row.index:  # written before the record: the TotalSegmentator layout
        return MaskSources(legacy_folder=(Path(row["volume"]).parent / "segmentations").as_posix())
    label_map = row.get("label_map")
    return MaskSources(
        files=_json_dict(row.get("masks")),
        label_map=label_map if isinstance(label_map, str) and label_map else None,
        labels=_json_dict(row.get("labels")),
    )


def _json_dict(value: object) -> dict:
    return json.loads(value) if isinstance(value, str) and value else {}


def _grid_masks(index: RenderIndex, scan_row: int, grid: ScanGrid, names: list[str]) -> dict[str, np.ndarray]:
    """Boolean masks of ``names`` on the scan's slicing grid; a problem is one :class:`MedsaeError` line."""
    sources = mask_sources(index, scan_row)
    out: dict[str, np.ndarray] = {}
    shape = grid.u8.shape
    in_map = [n for n in names if sources.file_of(n) is None and n in sources.labels]
    if in_map:
        path = index.root / str(sources.label_map)
        try:
            raw, affine = load_mask_file(path)
            labels = prepare_mask("label map", raw, affine, grid.prep, keep_labels=True)
            if labels.shape != shape:
                raise ScanError("label map does not match the image grid")
        except ScanError as exc:
            raise MedsaeError(f"{path}: cannot render masks: {exc}") from None
        for name in in_map:
            out[name] = structure_mask(labels, sources.labels[name])
    for name in names:
        if name in out:
            continue
        rel = sources.file_of(name)
        if rel is None:
            volume = index.root / index.scans.iloc[int(scan_row)]["volume"]
            raise MedsaeError(f"{volume}: the ingest recorded no mask of structure {name!r} for this scan")
        path = index.root / rel
        try:
            raw, affine = load_mask_file(path)
            mask = prepare_mask(name, raw, affine, grid.prep)
            if mask.shape != shape:
                raise ScanError(f"mask {name} does not match the image grid")
        except ScanError as exc:
            raise MedsaeError(f"{path}: cannot render the mask: {exc}") from None
        out[name] = mask
    return out


def render_masks(
    index: RenderIndex, scan_row: int, slice_ids: np.ndarray, structures: list[list[str]], size: int
) -> list[dict[str, np.ndarray]]:
    """Per slice of ``slice_ids`` (all of scan ``scan_row``), ``structure -> bool [size, size]`` for the
    structures in ``structures[i]``, on the pixels :func:`medsae.data.render.render_scan_images` shows."""
    ids = np.asarray(slice_ids, dtype=np.int64)
    out: list[dict[str, np.ndarray]] = [{} for _ in ids]
    names = sorted({s for wanted in structures for s in wanted})
    if not names:
        return out
    grid = scan_grid(index, scan_row)
    volumes = _grid_masks(index, scan_row, grid, names)
    axes, idx = index.axis[ids], index.idx[ids]
    for name, volume in volumes.items():
        as_u8 = volume.view(np.uint8) * np.uint8(255)
        wanted = np.asarray([name in w for w in structures])
        for axis in np.unique(axes[wanted]):
            sel = np.flatnonzero(wanted & (axes == axis))
            images = render_from_volume(as_u8, int(axis), idx[sel], index.options, size, grid.flat, MASK_RESIZE)
            for i, image in zip(sel, images, strict=True):
                out[i][name] = image >= 128
    return out

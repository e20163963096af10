"""Slice images on demand, from the volumes, exactly as the embed stage sees them.

No pixels are stored at ingest. A slice is rendered by: load the volume with the scan's reader
(:mod:`medsae.data.readers`), :func:`prepare` it (same grid as ingest), map intensities with the
scan's recorded :class:`IntensityMap`, take the slice along its axis, crop, turn it upright in the
display orientation (:mod:`medsae.data.orientation`; 2-D images as stored) and resize to ``size``.

* :func:`render_slice` — one slice (the volume stays cached, so neighbours are cheap);
* :func:`render_scan_images` — the slices of one scan (:mod:`medsae.data.masks` renders their
  structure masks on the same pixels, from the grid :func:`scan_grid` records);
* :func:`iter_scan_images` — all requested slices, grouped by scan, one volume read per scan;
  the embed stage's input pipeline (optionally with worker processes);
* :func:`thumbnail` — a PNG, cached on disk in ``<slices_dir>/../.cache/<key>/thumbs/<size>/``
  (next to the planner's ``.tmp``/``.work`` folders, outside the artifact itself). The one thumbnail
  cache: the one-file report, the LLM explainer's and the study's vision prompts and the HTML
  explorer (:mod:`medsae.report.site.thumbcache`, which fills it in batches) all read these files.
  A cache file is used only if it is a whole PNG (:func:`png_is_whole`), and is written through a
  uniquely named temporary file and ``os.replace`` (:func:`write_atomic`), so concurrent writers
  leave whole files only.

Volumes are found under the dataset root recorded in ``render.json``: first relative to the
artifacts folder (a project folder moved with its data), then as an absolute path; set
``MEDSAE_DATA_ROOT`` to render from a copy of the dataset anywhere else.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from medsae.data.intensity import IntensityMap
from medsae.data.orientation import display
from medsae.data.readers import FLAT_READERS, load_scan
from medsae.data.slicing import pad_square, resize_images, take_slices
from medsae.data.volume import Prepared, ScanError, SliceOptions, prepare, prepare_flat
from medsae.errors import MedsaeError, MissingInputError


@dataclass(frozen=True)
class RenderIndex:
    """What rendering needs from a slices artifact, loaded once per process."""

    root: Path
    options: SliceOptions
    scans: pd.DataFrame  # one row per indexed scan (scans.parquet)
    scan_of_slice: np.ndarray  # int32 row in ``scans`` per slice_id
    axis: np.ndarray  # int8 per slice_id
    idx: np.ndarray  # int32 per slice_id


@lru_cache(maxsize=8)
def _load_index(slices_dir: str, stamp: float) -> RenderIndex:
    base = Path(slices_dir)
    for name in ("render.json", "scans.parquet", "slices.parquet"):
        if not (base / name).is_file():
            raise MissingInputError(f"{base / name}: not found (is {base} a completed slices artifact?)")
    spec = json.loads((base / "render.json").read_text())
    scans = pd.read_parquet(base / "scans.parquet")
    slices = pd.read_parquet(base / "slices.parquet", columns=["modality", "image_id", "axis", "idx"])
    row_of = {(m, i): r for r, (m, i) in enumerate(zip(scans["modality"], scans["image_id"], strict=True))}
    scan_of_slice = np.fromiter(
        (row_of[k] for k in zip(slices["modality"], slices["image_id"], strict=True)),
        dtype=np.int32,
        count=len(slices),
    )
    root = _dataset_root(base, spec)
    return RenderIndex(
        root=root,
        options=SliceOptions.from_json(spec["options"]),
        scans=scans,
        scan_of_slice=scan_of_slice,
        axis=slices["axis"].to_numpy(np.int8),
        idx=slices["idx"].to_numpy(np.int32),
    )


def _dataset_root(base: Path, spec: dict) -> Path:
    """``$MEDSAE_DATA_ROOT``, else the dataset beside the artifacts (moved projects), else as recorded."""
    if os.environ.get("MEDSAE_DATA_ROOT"):
        return Path(os.environ["MEDSAE_DATA_ROOT"])
    relative = spec.get("root_from_artifacts")
    if relative:
        moved = (base.parent.parent / relative).resolve()
        if moved.is_dir():
            return moved
    return Path(spec["root"])


def render_index(slices_dir: str | Path) -> RenderIndex:
    """The (cached) render index of a slices artifact."""
    path = Path(slices_dir).resolve()
    marker = path / "slices.parquet"
    stamp = marker.stat().st_mtime if marker.exists() else 0.0
    return _load_index(str(path), stamp)


@dataclass(frozen=True)
class ScanGrid:
    """A scan on its slicing grid: the uint8 volume images are cut from, and how the grid was made.

    ``prep`` is the :class:`Prepared` record without its float array: its source grid, reorientation
    and resampling are what a mask of the scan follows onto the same grid (:mod:`medsae.data.masks`).
    """

    u8: np.ndarray
    prep: Prepared
    flat: bool  # a 2-D image (shown as stored)


_GRID_CACHE: dict[tuple[str, int, int], ScanGrid] = {}


def scan_grid(index: RenderIndex, scan_row: int) -> ScanGrid:
    """A scan's prepared grid and uint8 volume (the last scan is cached per process)."""
    key = (str(index.root), int(scan_row), id(index))
    if key in _GRID_CACHE:
        return _GRID_CACHE[key]
    row = index.scans.iloc[int(scan_row)]
    path = index.root / row["volume"]
    reader = scan_reader(row)
    flat = reader in FLAT_READERS
    files = json.loads(row["files"]) if isinstance(row.get("files"), str) else []
    try:
        array, affine = load_scan(index.root, reader, row["volume"], files)
        if flat:
            prep = prepare_flat(array.astype(np.float32))
        else:
            prep = prepare(array, affine, row["modality"], index.options)
    except ScanError as exc:
        raise MedsaeError(f"{path}: cannot render slices: {exc}") from None
    del array
    shape = json.loads(row["shape"])
    if list(prep.array.shape) != shape:
        raise MedsaeError(f"{path}: volume grid {list(prep.array.shape)} differs from the ingested {shape}")
    imap = IntensityMap(row["clip_lo"], row["clip_hi"], row["out_lo"], row["out_hi"])
    grid = ScanGrid(imap.apply(prep.array), replace(prep, array=np.empty(0, dtype=np.float32)), flat)
    _GRID_CACHE.clear()
    _GRID_CACHE[key] = grid
    return grid


def scan_volume_u8(index: RenderIndex, scan_row: int) -> np.ndarray:
    """A scan's prepared volume mapped to uint8 (the last one is cached per process)."""
    return scan_grid(index, scan_row).u8


def scan_reader(row: pd.Series) -> str:
    """The reader of a scans.parquet row (artifacts older than the column hold NIfTI volumes)."""
    reader = row.get("reader")
    return reader if isinstance(reader, str) and reader else "nifti"


def render_from_volume(
    u8: np.ndarray,
    axis: int,
    idx: np.ndarray,
    options: SliceOptions,
    size: int,
    flat: bool = False,
    resize: str | None = None,
) -> np.ndarray:
    """Images ``[n, size, size]`` uint8 of slices ``idx`` along ``axis`` of a uint8 volume (``flat``: 2-D).

    ``resize`` overrides the options' resampling (masks are resized bilinear, then thresholded).
    """
    images = take_slices(u8, axis, idx, options.crop)
    if options.crop == "none":
        images = pad_square(images)
    # orientation first: flipping the small crop is cheaper and commutes with the square resize
    upright = np.ascontiguousarray(images) if flat else display(images, axis, options.orientation)
    return resize_images(upright, size, resize or options.resize)


def render_scan_images(index: RenderIndex, scan_row: int, ids: np.ndarray, size: int) -> np.ndarray:
    """Images ``[n, size, size]`` uint8 of slices ``ids`` (all of scan ``scan_row``), as the embed stage sees them."""
    grid = scan_grid(index, scan_row)
    out = np.empty((len(ids), size, size), dtype=np.uint8)
    axes = index.axis[ids]
    for axis in np.unique(axes):
        sel = np.flatnonzero(axes == axis)
        out[sel] = render_from_volume(grid.u8, int(axis), index.idx[ids[sel]], index.options, size, grid.flat)
    return out


def _check_ids(index: RenderIndex, ids: np.ndarray, slices_dir: str | Path) -> None:
    n = len(index.axis)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        bad = int(ids[(ids < 0) | (ids >= n)][0])
        raise MedsaeError(f"{slices_dir}: slice_id {bad} out of range (index has {n} slices)")


def render_slice(slices_dir: str | Path, slice_id: int, size: int | None = None) -> np.ndarray:
    """The uint8 image ``[size, size]`` of one slice (``size`` defaults to the spec's)."""
    index = render_index(slices_dir)
    ids = np.asarray([int(slice_id)], dtype=np.int64)
    _check_ids(index, ids, slices_dir)
    return render_scan_images(index, int(index.scan_of_slice[ids[0]]), ids, size or index.options.size)[0]


def _scan_groups(index: RenderIndex, ids: np.ndarray) -> list[np.ndarray]:
    """Sorted ids split into runs of the same scan."""
    scans = index.scan_of_slice[ids]
    cuts = np.flatnonzero(np.diff(scans)) + 1
    return np.split(ids, cuts)


def _render_group(args: tuple[str, np.ndarray, int]) -> tuple[np.ndarray, np.ndarray]:
    slices_dir, ids, size = args
    index = render_index(slices_dir)
    return ids, render_scan_images(index, int(index.scan_of_slice[ids[0]]), ids, size)


def iter_scan_images(
    slices_dir: str | Path, slice_ids: np.ndarray | None = None, size: int | None = None, workers: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(slice_ids, images uint8 [n, size, size])`` one scan at a time, in slice_id order.

    ``slice_ids`` (default: all) are de-duplicated and sorted; each volume is read once. With
    ``workers > 0`` scans are rendered in that many processes, ahead of the consumer.
    """
    index = render_index(slices_dir)
    if slice_ids is None:
        ids = np.arange(len(index.axis), dtype=np.int64)
    else:
        ids = np.unique(np.asarray(slice_ids, dtype=np.int64))
    _check_ids(index, ids, slices_dir)
    if ids.size == 0:
        return
    size = size or index.options.size
    groups = _scan_groups(index, ids)
    if workers <= 0 or len(groups) <= 1:
        for group in groups:
            yield group, render_scan_images(index, int(index.scan_of_slice[group[0]]), group, size)
        return
    from concurrent.futures import ProcessPoolExecutor

    path = str(Path(slices_dir).resolve())
    with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context()) as ex:
        yield from ex.map(_render_group, [(path, g, size) for g in groups])


#: Folder of the thumbnail cache of a slices artifact (under ``<artifacts>/slices/.cache/<key>/``).
THUMBS_FOLDER = "thumbs"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def thumbnail_folder(slices_dir: str | Path, size: int = 128) -> Path:
    """The cache folder of a slices artifact's thumbnails at ``size`` px."""
    base = Path(slices_dir).resolve()
    return base.parent / ".cache" / base.name / THUMBS_FOLDER / str(int(size))


def thumbnail_path(slices_dir: str | Path, slice_id: int, size: int = 128) -> Path:
    """Where the cached PNG of a slice lives."""
    return thumbnail_folder(slices_dir, size) / f"{int(slice_id)}.png"


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image: what :func:`thumbnail` returns and the cache stores.

    These bytes go into LLM vision requests, whose content hashes key the LLM cache: changing the
    encoding would make every cached vision answer miss.
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def png_is_whole(data: bytes) -> bool:
    """Whether ``data`` is a complete PNG: the signature, chunks whose CRCs match, and ``IEND`` at the end."""
    if not data.startswith(_PNG_SIGNATURE):
        return False
    view = memoryview(data)
    pos, end = len(_PNG_SIGNATURE), len(data)
    while pos + 12 <= end:
        length = int.from_bytes(view[pos : pos + 4], "big")
        stop = pos + 12 + length
        if stop > end:
            return False
        if zlib.crc32(view[pos + 4 : stop - 4]) != int.from_bytes(view[stop - 4 : stop], "big"):
            return False
        if view[pos + 4 : pos + 8] == b"IEND":
            return stop == end
        pos = stop
    return False


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a uniquely named temporary file in the same folder and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def thumbnail(slices_dir: str | Path, slice_id: int, size: int = 128) -> bytes:
    """PNG bytes of a slice at ``size`` pixels, rendered once and cached on disk.

    A cache file that is not a whole PNG (truncated, corrupt) is rendered again and replaced.
    """
    path = thumbnail_path(slices_dir, slice_id, size)
    try:
        cached = path.read_bytes()
    except OSError:
        cached = None
    if cached is not None and png_is_whole(cached):
        return cached
    data = encode_png(render_slice(slices_dir, slice_id, size=size))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
    except OSError:
        pass  # a read-only artifacts folder still renders, just without the cache
    return data


def _mp_context():
    """Fork where available: workers start instantly and scripts need no ``__main__`` guard.

    Workers only run numpy/nibabel code, so forking a parent that imported torch or duckdb is safe.
    """
    import multiprocessing as mp

    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")

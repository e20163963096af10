"""Indexing scans: one scan in, its slices and per-structure pixel areas out.

:func:`index_scan` is the per-scan worker (run in a process pool by :mod:`medsae.data.build`).
It reads the volume (or 2-D image, :mod:`medsae.data.readers`) once, computes its intensity
mapping, then reads each mask once and counts, for every sliced axis, the mask pixels inside each
slice's crop; a multi-label map is read once for all its structures (:mod:`medsae.data.labelmap`).
A scan without any mask keeps every slice (there is no anatomy to filter by). The result (a "part") is written
atomically to ``<work_dir>/parts/`` so an interrupted ingest resumes at the next volume. Any
problem with a scan becomes a part that records the skip reason instead of an exception; the
reason lists every problem found ('; '-separated): problems known before reading (missing masks,
bad links), the volume's, and each unreadable or misfitting mask's. Memory: one volume plus one
mask per worker.
"""

from __future__ import annotations

import json
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsae.data.anatomy import BODY_REGIONS, structure_body_region
from medsae.data.images2d import image_map
from medsae.data.intensity import ct_map, ct_window, mri_map
from medsae.data.labelmap import label_areas, unlisted_values
from medsae.data.readers import FLAT_READERS, load_mask_file, load_scan
from medsae.data.slicing import axis_codes, crop_bounds, inplane_axes
from medsae.data.volume import ScanError, SliceOptions, prepare, prepare_flat, prepare_mask

#: test hook: seconds to sleep per volume (used to interrupt an ingest mid-way in tests)
THROTTLE_ENV = "MEDSAE_INGEST_THROTTLE"


@dataclass
class ScanTask:
    """Everything a worker needs to index one scan (plain, picklable data)."""

    modality: str
    image_id: str
    dataset: str
    root: str
    volume: str  # relative to root (or absolute); a DICOM series' folder
    masks: dict[str, str] = field(default_factory=dict)  # structure -> path relative to root
    study_type: str | None = None
    #: problems found before reading (missing masks, bad links): the scan is skipped, but its
    #: volume is still read so that a corrupt one is recorded as well
    problems: list[str] = field(default_factory=list)
    reader: str = "nifti"  # medsae.data.readers.READERS
    files: list[str] = field(default_factory=list)  # DICOM: the series' files in slice order
    label_map: str | None = None  # a multi-label mask (path relative to root) ...
    labels: dict[str, list[int]] = field(default_factory=dict)  # ... and its table: structure -> values

    @property
    def segmented(self) -> bool:
        """Whether the scan comes with any mask (otherwise every slice is kept)."""
        return bool(self.masks) or self.label_map is not None

    @property
    def part_name(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.image_id)
        if safe != self.image_id:
            safe += "-" + format(zlib.crc32(self.image_id.encode()), "08x")
        return f"{self.modality}__{safe}.npz"


def structure_counts(mask: np.ndarray, axes: tuple[int, ...], crop: str) -> dict[int, np.ndarray]:
    """Per sliced axis, pixels of a boolean mask inside each slice's in-plane crop.

    Works on the mask's bounding box only, so small and empty structures cost one pass.
    """
    shape = mask.shape
    out = {a: np.zeros(shape[a], dtype=np.int64) for a in axes}
    px = np.flatnonzero(mask.any(axis=(1, 2)))
    if px.size == 0:
        return out
    block = mask[px[0] : px[-1] + 1]
    py = np.flatnonzero(block.any(axis=(0, 2)))
    pz = np.flatnonzero(block.any(axis=(0, 1)))
    lo = (int(px[0]), int(py[0]), int(pz[0]))
    hi = (int(px[-1]) + 1, int(py[-1]) + 1, int(pz[-1]) + 1)
    sub = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    for a in axes:
        b, c = inplane_axes(a)
        cb, cc = crop_bounds(shape[b], shape[c], crop)
        index = [slice(None)] * 3
        empty = False
        for ax, cs in ((b, cb), (c, cc)):
            start, stop = max(cs.start, lo[ax]), min(cs.stop, hi[ax])
            if start >= stop:
                empty = True
            index[ax] = slice(start - lo[ax], stop - lo[ax])
        if not empty:
            out[a][lo[a] : hi[a]] = np.count_nonzero(sub[tuple(index)], axis=(b, c))
    return out


def _region_matrix(names: list[str]) -> np.ndarray:
    """[n_names, n_regions] one-hot of each structure's coarse body region."""
    onehot = np.zeros((len(names), len(BODY_REGIONS)), dtype=np.int64)
    for i, name in enumerate(names):
        region = structure_body_region(name)
        if region is not None:
            onehot[i, BODY_REGIONS.index(region)] = 1
    return onehot


def body_region_codes(areas: np.ndarray, names: list[str], threshold: int) -> np.ndarray:
    """Index into BODY_REGIONS per slice (-1 = none) from an [n_slices, n_names] area matrix."""
    if areas.size == 0:
        return np.full(areas.shape[0], -1, dtype=np.int8)
    present = np.where(areas > threshold, areas, 0)
    votes = present @ _region_matrix(names)
    codes = np.argmax(votes, axis=1).astype(np.int8)  # ties -> the more cranial region
    codes[votes.max(axis=1) <= 0] = -1
    return codes


def _empty_part(task: ScanTask, opts: SliceOptions, reason: str) -> dict[str, Any]:
    info = {**_task_info(task, opts), "status": "skipped", "reason": reason}
    return {"info": info, **_arrays([], [], [], [], [], [], [], [], [])}


def _task_info(task: ScanTask, opts: SliceOptions) -> dict[str, Any]:
    return {
        "modality": task.modality,
        "image_id": task.image_id,
        "dataset": task.dataset,
        "volume": task.volume,
        "reader": task.reader,
        "files": list(task.files),
        "study_type": task.study_type,
        # where the masks are, so that rendering finds them again (medsae.data.masks)
        "masks": dict(task.masks),
        "label_map": task.label_map,
        "labels": dict(task.labels),
        "opts": opts.digest(),
    }


def _arrays(axis, idx, n_along, n_structures, region, st_row, st_code, st_pixels, names) -> dict[str, np.ndarray]:
    return {
        "axis": np.asarray(axis, dtype=np.int8),
        "idx": np.asarray(idx, dtype=np.int32),
        "n_along": np.asarray(n_along, dtype=np.int32),
        "n_structures": np.asarray(n_structures, dtype=np.int16),
        "region": np.asarray(region, dtype=np.int8),
        "st_row": np.asarray(st_row, dtype=np.int32),
        "st_code": np.asarray(st_code, dtype=np.int16),
        "st_pixels": np.asarray(st_pixels, dtype=np.int32),
        "names": np.asarray(names, dtype=str),
    }


def index_scan(task: ScanTask, opts: SliceOptions) -> dict[str, Any]:
    """Index one scan; never raises for a bad scan (returns a part with status 'skipped').

    The skip reason names every problem: those the task carries, the volume's and each mask's.
    """
    start = time.perf_counter()
    root = Path(task.root)
    problems = list(task.problems)
    try:
        try:
            array, affine = load_scan(root, task.reader, task.volume, task.files)
        except ScanError as exc:
            problems.insert(0, str(exc))
            problems += _unreadable_masks(root, task)
            return _empty_part(task, opts, "; ".join(problems))
        if problems:  # the volume reads, but the scan is incomplete: only unreadable masks left to find
            return _empty_part(task, opts, "; ".join(problems + _unreadable_masks(root, task)))
        info = _task_info(task, opts)
        if task.reader in FLAT_READERS:
            imap = image_map(array)
            prep = prepare_flat(array.astype(np.float32))
            codes: tuple[str, ...] = ()
            info.update(window_center=None, window_width=None, window_source="none")
        else:
            codes = axis_codes(affine)
            prep = prepare(array, affine, task.modality, opts)
            if task.modality == "ct":
                c, w, source = ct_window(task.study_type, opts.ct_default_window)
                imap = ct_map(prep.array, c, w, opts.ct_scaling)
                info.update(window_center=c, window_width=w, window_source=source)
            else:
                imap = mri_map(prep.array, opts.mri_percentiles)
                info.update(window_center=None, window_width=None, window_source="percentile")
        del array
        grid_shape = tuple(prep.array.shape)
        prep.array = np.empty(0, dtype=np.float32)  # free the image before reading masks
        strided = {a: np.arange(0, grid_shape[a], opts.stride) for a in prep.axes}
        names, areas = _mask_areas(root, task, prep, grid_shape, strided, opts, problems, info)
        if problems:
            return _empty_part(task, opts, "; ".join(problems))
        part = _collect(areas, strided, grid_shape, names, opts, keep_all=not task.segmented)
        info.update(
            status="ok",
            reason=None,
            clip_lo=imap.clip_lo,
            clip_hi=imap.clip_hi,
            out_lo=imap.out_lo,
            out_hi=imap.out_hi,
            axis_codes="".join(codes),
            planes=list(prep.planes),
            shape=list(grid_shape),
            resample_axes=list(prep.resample_axes),
            resample_target=prep.resample_target,
            n_slices=int(len(part["idx"])),
        )
        if len(part["idx"]) == 0:
            info.update(status="skipped", reason="no structure in any slice")
    except ScanError as exc:
        return _empty_part(task, opts, "; ".join([*problems, str(exc)]))
    except MemoryError:
        return _empty_part(task, opts, "; ".join([*problems, "out of memory while reading the volume"]))
    except Exception as exc:  # an unexpected problem with this scan must not stop the ingest
        text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return _empty_part(task, opts, "; ".join([*problems, text]))
    info["seconds"] = round(time.perf_counter() - start, 4)
    return {"info": info, **part}


def _mask_areas(
    root: Path,
    task: ScanTask,
    prep: Any,
    grid_shape: tuple[int, ...],
    strided: dict[int, np.ndarray],
    opts: SliceOptions,
    problems: list[str],
    info: dict[str, Any],
) -> tuple[list[str], dict[int, np.ndarray]]:
    """Structure names and, per sliced axis, pixel areas ``[n_strided, n_names]`` (problems appended)."""
    if task.label_map is not None:
        names = sorted(task.labels)
        areas = {a: np.zeros((len(strided[a]), len(names)), dtype=np.int64) for a in prep.axes}
        try:
            raw, mask_affine = load_mask_file(root / task.label_map)
            labels = prepare_mask("label map", raw, mask_affine, prep, keep_labels=True)
            del raw
            if labels.shape != grid_shape:
                raise ScanError("label map does not match the image grid")
        except ScanError as exc:
            problems.append(str(exc))
            return names, areas
        info["unlisted_labels"] = unlisted_values(labels, task.labels)
        names, by_axis = label_areas(labels, task.labels, prep.axes, opts.crop)
        return names, {a: by_axis[a][strided[a]] for a in prep.axes}
    names = sorted(task.masks)
    areas = {a: np.zeros((len(strided[a]), len(names)), dtype=np.int64) for a in prep.axes}
    for j, name in enumerate(names):
        try:
            raw, mask_affine = load_mask_file(root / task.masks[name])
            mask = prepare_mask(name, raw, mask_affine, prep)
            del raw
            if mask.shape != grid_shape:
                raise ScanError(f"mask {name} does not match the image grid")
        except ScanError as exc:
            problems.append(str(exc))
            continue
        if problems:
            continue  # keep checking the other masks, but the scan is skipped anyway
        for a, counts in structure_counts(mask, prep.axes, opts.crop).items():
            areas[a][:, j] = counts[strided[a]]
    return names, areas


def _unreadable_masks(root: Path, task: ScanTask) -> list[str]:
    """Problems of the masks that cannot be read at all (when the scan is skipped before its masks are)."""
    problems = []
    paths = [task.masks[name] for name in sorted(task.masks)]
    if task.label_map is not None:
        paths.append(task.label_map)
    for rel in paths:
        try:
            load_mask_file(root / rel)
        except ScanError as exc:
            problems.append(str(exc))
    return problems


def _collect(
    areas: dict[int, np.ndarray],
    strided: dict[int, np.ndarray],
    shape: tuple[int, ...],
    names: list[str],
    opts: SliceOptions,
    keep_all: bool = False,
) -> dict[str, np.ndarray]:
    """Slices kept per axis (anatomy filter unless ``keep_all``), their structure rows and body regions."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("axis", "idx", "n_along", "n_structures", "region")}
    st: dict[str, list[np.ndarray]] = {"row": [], "code": [], "pixels": []}
    offset = 0
    for a in sorted(areas):
        mat, idx = areas[a], strided[a]
        present = mat > opts.presence_threshold
        any_present = present.any(axis=1)
        if opts.anatomy_filter and not keep_all:
            hit = np.flatnonzero(any_present)
            if hit.size == 0:
                continue
            keep = np.arange(hit[0], hit[-1] + 1)
        else:
            keep = np.arange(len(idx))
        mat = mat[keep]
        cols["axis"].append(np.full(len(keep), a))
        cols["idx"].append(idx[keep])
        cols["n_along"].append(np.full(len(keep), shape[a]))
        cols["n_structures"].append(present[keep].sum(axis=1))
        cols["region"].append(body_region_codes(mat, names, opts.presence_threshold))
        rows, codes = np.nonzero(mat)
        st["row"].append(rows + offset)
        st["code"].append(codes)
        st["pixels"].append(mat[rows, codes])
        offset += len(keep)

    def cat(values: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(values) if values else np.zeros(0, dtype=np.int64)

    return _arrays(
        cat(cols["axis"]), cat(cols["idx"]), cat(cols["n_along"]), cat(cols["n_structures"]),
        cat(cols["region"]), cat(st["row"]), cat(st["code"]), cat(st["pixels"]), names,
    )  # fmt: skip


# -- part files ------------------------------------------------------------------------------------


def write_part(path: Path, part: dict[str, Any]) -> None:
    """Write a part atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    arrays = {k: v for k, v in part.items() if k != "info"}
    np.savez(tmp, info=np.asarray(json.dumps(part["info"])), **arrays)
    os.replace(tmp, path)


def read_part(path: Path) -> dict[str, Any] | None:
    """A part file, or None when it is unreadable (it is then recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            part = {k: data[k] for k in data.files}
        part["info"] = json.loads(str(part["info"]))
        return part
    except Exception:
        return None


def process_task(task: ScanTask, opts: SliceOptions, parts_dir: str) -> tuple[str, str, int, float]:
    """Pool entry point: index a scan and commit its part; returns (name, status, n_slices, seconds)."""
    part = index_scan(task, opts)
    delay = float(os.environ.get(THROTTLE_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    write_part(Path(parts_dir) / task.part_name, part)
    info = part["info"]
    return task.part_name, info["status"], int(len(part["idx"])), float(info.get("seconds", 0.0))

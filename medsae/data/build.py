"""The ingest driver: scans -> process pool -> parts -> the slice index of a slices artifact.

``run_ingest`` is what both the ``slices`` stage and ``medsae data ingest`` call:

1. list the source's scans (:func:`medsae.data.sources.collect_scans`: TotalSegmentator layout,
   manifest or DICOM folder) and note what is wrong with them before reading anything (a meta.csv
   or manifest row without an image, missing masks, dangling or looping links, DICOM series that do
   not assemble); a scan with such a problem but an image file is still read, so a corrupt image is
   recorded too: every scan records all of its problems, not only the first;
2. index every remaining scan not already done in ``work_dir/parts`` (a process pool when
   ``workers > 1``), each scan committed as one part file;
3. assemble the parts: join the metadata, assign splits, sort by (modality, image_id, plane, idx),
   number the slices, and write ``slices.parquet``, ``slice_structures.parquet``,
   ``structures.json``, ``skipped.parquet``, ``scans.parquet``, ``splits.parquet`` and
   ``render.json`` to ``out_dir``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from medsae.data.anatomy import BODY_REGIONS
from medsae.data.config import DataSpec
from medsae.data.ingest import ScanTask, process_task, read_part
from medsae.data.scans import STANDARD_META, SourceScans
from medsae.data.sources import collect_scans
from medsae.data.splits import default_split_path, load_or_create_splits
from medsae.data.totalsegmentator import DATASETS
from medsae.data.volume import SliceOptions
from medsae.errors import MedsaeError
from medsae.stage import as_section
from medsae.threads import worker_count

Progress = Callable[..., Iterator[Any]]

#: columns of the registry's ``slices`` table (minus slices_key, which the planner fills)
REGISTRY_SLICE_COLUMNS = [
    "slice_id", "slice_uid", "dataset", "modality", "image_id", "plane", "axis", "idx", "position",
    "split", "institute", "sex", "age", "age_bin", "study_type", "pathology", "pathology_location",
    "manufacturer", "scanner_model", "body_region", "n_structures",
]  # fmt: skip
_INT_COLUMNS = {"slice_id", "axis", "idx", "n_structures", "n_along"}
_FLOAT_COLUMNS = {"position", "age"}


def slice_schema(columns: list[str]) -> pa.Schema:
    """Arrow types of slice-table columns (strings stay strings even when a column is all null)."""

    def kind(c: str) -> pa.DataType:
        return pa.int64() if c in _INT_COLUMNS else pa.float64() if c in _FLOAT_COLUMNS else pa.string()

    return pa.schema([(c, kind(c)) for c in columns])


def slice_table(frame: pd.DataFrame, columns: list[str]) -> pa.Table:
    """``frame[columns]`` as an Arrow table with :func:`slice_schema` types."""
    return pa.Table.from_pandas(frame[columns], schema=slice_schema(columns), preserve_index=False)


@dataclass
class IngestResult:
    """What an ingest produced (the files are in ``out_dir``)."""

    out_dir: Path
    slices: pd.DataFrame
    structures: pd.DataFrame  # slice_id, structure, pixels
    skips: list[dict[str, Any]]
    vocab: list[str]
    scans_read: int
    volumes_indexed: int  # in this run (the rest came from parts of an interrupted run)
    volumes_resumed: int
    slices_indexed: int  # slices of the volumes indexed in this run
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


def _plain(iterable: Iterable[Any], total: int | None = None, description: str = "") -> Iterator[Any]:
    yield from iterable


def _run_pool(
    todo: list[ScanTask], opts: SliceOptions, parts_dir: Path, workers: int, progress: Progress
) -> tuple[int, int]:
    """Index ``todo``; returns (volumes, slices) done in this run."""
    n_slices = 0
    workers = worker_count(workers)  # no more processes than the CPUs this process may use
    if workers <= 1 or len(todo) <= 1:
        for task in progress(todo, total=len(todo), description="ingest volumes"):
            n_slices += process_task(task, opts, str(parts_dir))[2]
        return len(todo), n_slices
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=_mp_context()) as ex:
        futures = [ex.submit(process_task, t, opts, str(parts_dir)) for t in todo]
        for fut in progress(as_completed(futures), total=len(futures), description="ingest volumes"):
            n_slices += fut.result()[2]
    return len(todo), n_slices


def run_ingest(
    root: str | Path,
    data: DataSpec | Mapping[str, Any],
    out_dir: str | Path,
    work_dir: str | Path,
    progress: Progress | None = None,
) -> IngestResult:
    """Index the dataset at ``root`` with the ``data:`` section ``data``; files go to ``out_dir``.

    ``data`` may be plain data (scripts, benchmarks); it is validated as a :class:`DataSpec` first.
    Raises :class:`MedsaeError` when no slice at all could be indexed (every scan skipped).
    """
    start = time.perf_counter()
    data = as_section(DataSpec, data)
    root = Path(root).resolve()
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    progress = progress or _plain
    opts = SliceOptions.from_spec(data)
    source = collect_scans(root, data)
    tasks, skips = source.tasks, list(source.skips)

    parts_dir = work_dir / "parts"
    digest = opts.digest()
    done: dict[str, dict[str, Any]] = {}
    for task in tasks:
        path = parts_dir / task.part_name
        if path.is_file():
            part = read_part(path)
            if part is not None and part["info"].get("opts") == digest:
                done[task.part_name] = part
    todo = [t for t in tasks if t.part_name not in done]
    resumed = len(done)
    n_volumes, n_new_slices = _run_pool(todo, opts, parts_dir, data.workers, progress)
    parts = []
    for task in tasks:
        part = done.get(task.part_name) or read_part(parts_dir / task.part_name)
        if part is None:  # cannot happen unless the disk lost it; never drop silently
            skips.append({"modality": task.modality, "image_id": task.image_id, "reason": "part file lost"})
            continue
        parts.append(part)

    split_table = _splits(root, source.split_frame, data)
    slices, structures, vocab, scan_rows = _assemble(parts, source, split_table)
    for part in parts:
        info = part["info"]
        if info["status"] != "ok":
            skips.append({"modality": info["modality"], "image_id": info["image_id"], "reason": info["reason"]})
    skips.sort(key=lambda r: (r["modality"], r["image_id"]))
    if slices.empty:
        first = f"; first: {skips[0]['modality']}/{skips[0]['image_id']}: {skips[0]['reason']}" if skips else ""
        raise MedsaeError(
            f"{root}: no slices indexed ({len(tasks) + len(source.skips)} scans found, {len(skips)} skipped{first})"
        )
    seconds = time.perf_counter() - start
    _write_outputs(out_dir, root, opts, slices, structures, vocab, skips, scan_rows, split_table, source.format)
    result = IngestResult(
        out_dir=out_dir,
        slices=slices,
        structures=structures,
        skips=skips,
        vocab=vocab,
        scans_read=int(slices[["modality", "image_id"]].drop_duplicates().shape[0]) if len(slices) else 0,
        volumes_indexed=n_volumes,
        volumes_resumed=resumed,
        slices_indexed=n_new_slices,
        seconds=seconds,
    )
    result.summary = summarize(result)
    return result


def _splits(root: Path, frame: pd.DataFrame, data: DataSpec) -> pd.DataFrame:
    """The dataset's stored split table, covering every scan of every modality."""
    test, val, seed = list(data.test_institutes), data.val_fraction, data.split_seed
    path = Path(data.split_file) if data.split_file else default_split_path(root, test, val, seed)
    return load_or_create_splits(path, frame, test, val, seed)


def _assemble(
    parts: list[dict[str, Any]], source: SourceScans, split_table: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, list[str], list[dict[str, Any]]]:
    """Join parts, meta and splits into the sorted slice index and the long structure table."""
    ok = [p for p in parts if p["info"]["status"] == "ok"]
    vocab = sorted({str(n) for p in ok for n in p["names"]})
    code_of = {n: i for i, n in enumerate(vocab)}
    splits = {(m, i): s for m, i, s in split_table[["modality", "image_id", "split"]].itertuples(index=False)}
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("scan", "axis", "idx", "n_along", "n_structures", "region")}
    st_row, st_code, st_pixels = [], [], []
    scan_rows: list[dict[str, Any]] = []
    offset = 0
    for s_i, p in enumerate(ok):
        n = len(p["idx"])
        cols["scan"].append(np.full(n, s_i, dtype=np.int32))
        for k in ("axis", "idx", "n_along", "n_structures", "region"):
            cols[k].append(p[k])
        local = np.asarray([code_of[str(x)] for x in p["names"]], dtype=np.int32)
        st_row.append(p["st_row"].astype(np.int64) + offset)
        st_code.append(local[p["st_code"]] if len(p["st_code"]) else np.zeros(0, np.int32))
        st_pixels.append(p["st_pixels"])
        offset += n
        info = p["info"]
        scan_rows.append({k: v for k, v in info.items() if k not in ("status", "reason", "opts")})
    if not ok:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in REGISTRY_SLICE_COLUMNS})
        return empty, pd.DataFrame({"slice_id": [], "structure": [], "pixels": []}), vocab, scan_rows

    def cat(key: str) -> np.ndarray:
        return np.concatenate(cols[key])

    scan_i = cat("scan")
    frame = pd.DataFrame(
        {
            "row": np.arange(len(scan_i)),
            "modality": np.asarray([ok[i]["info"]["modality"] for i in range(len(ok))], dtype=object)[scan_i],
            "image_id": np.asarray([ok[i]["info"]["image_id"] for i in range(len(ok))], dtype=object)[scan_i],
            "axis": cat("axis").astype(np.int64),
            "idx": cat("idx").astype(np.int64),
            "n_along": cat("n_along").astype(np.int64),
            "n_structures": cat("n_structures").astype(np.int64),
            "region": cat("region").astype(np.int64),
            "scan": scan_i,
        }
    )
    planes = np.asarray([ok[i]["info"]["planes"] for i in range(len(ok))], dtype=object)
    frame["plane"] = [planes[s][a] for s, a in zip(scan_i, frame["axis"], strict=True)]
    frame = frame.sort_values(["modality", "image_id", "plane", "idx"], kind="stable").reset_index(drop=True)
    n = len(frame)
    slice_of_row = np.empty(n, dtype=np.int64)
    slice_of_row[frame["row"].to_numpy()] = np.arange(n)
    frame["slice_id"] = np.arange(n, dtype=np.int64)
    plane_or_image = frame["plane"].astype(object).where(frame["plane"].notna(), "image")  # 2-D: no plane
    frame["slice_uid"] = (
        frame["modality"] + "/" + frame["image_id"] + "/" + plane_or_image + "/" + frame["idx"].astype(str)
    )
    frame["position"] = np.where(frame["n_along"] > 1, frame["idx"] / (frame["n_along"] - 1).clip(lower=1), 0.0)
    regions = np.asarray((*BODY_REGIONS, None), dtype=object)
    frame["body_region"] = regions[frame["region"].to_numpy()]  # -1 -> None

    columns = [*STANDARD_META, *source.extra_columns]
    rows = []
    for i, p in enumerate(ok):
        key = (p["info"]["modality"], p["info"]["image_id"])
        values = source.meta.get(key, {})
        row = {"scan": i, "dataset": p["info"]["dataset"], "split": splits.get(key)}
        row.update({c: values.get(c) for c in columns})
        rows.append(row)
    frame = frame.merge(pd.DataFrame(rows), on="scan", how="left")
    order = REGISTRY_SLICE_COLUMNS + ["n_along"] + source.extra_columns
    slices = frame[order].copy()
    for column in source.extra_columns:  # extra metadata is text in slices.parquet
        slices[column] = slices[column].map(lambda v: None if v is None or v != v else str(v)).astype(object)
    slices["age"] = slices["age"].astype("float64")
    structures = pd.DataFrame(
        {
            "slice_id": slice_of_row[np.concatenate(st_row)],
            "structure": pd.Categorical.from_codes(np.concatenate(st_code), categories=vocab),
            "pixels": np.concatenate(st_pixels).astype(np.int32),
        }
    )
    structures = structures.sort_values(["slice_id", "structure"], kind="stable").reset_index(drop=True)
    return slices, structures, vocab, scan_rows


def _write_table(frame: pd.DataFrame | pa.Table, path: Path) -> None:
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table, path)


def _write_outputs(
    out_dir: Path,
    root: Path,
    opts: SliceOptions,
    slices: pd.DataFrame,
    structures: pd.DataFrame,
    vocab: list[str],
    skips: list[dict[str, Any]],
    scan_rows: list[dict[str, Any]],
    split_table: pd.DataFrame,
    source_format: str,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_table(slice_table(slices, list(slices.columns)), out_dir / "slices.parquet")
    _write_table(structures, out_dir / "slice_structures.parquet")
    (out_dir / "structures.json").write_text(json.dumps(vocab, indent=0))
    skip_frame = pd.DataFrame(skips, columns=["modality", "image_id", "reason"]).astype(object)
    _write_table(skip_frame, out_dir / "skipped.parquet")
    scans = pd.DataFrame(scan_rows)
    if len(scans):
        for col in ("planes", "shape", "resample_axes", "files", "unlisted_labels"):
            if col in scans.columns:
                scans[col] = scans[col].map(lambda v: json.dumps(v if isinstance(v, list) else []))
        for col in ("masks", "labels"):  # structure -> mask file / label values
            if col in scans.columns:
                scans[col] = scans[col].map(lambda v: json.dumps(v if isinstance(v, dict) else {}, sort_keys=True))
        scans = scans.sort_values(["modality", "image_id"]).reset_index(drop=True)
    _write_table(scans, out_dir / "scans.parquet")
    keys = slices[["modality", "image_id"]].drop_duplicates()
    _write_table(split_table.merge(keys, on=["modality", "image_id"]), out_dir / "splits.parquet")
    render = {
        "root": str(root),
        "root_from_artifacts": _relative_to_artifacts(root, out_dir),
        "datasets": DATASETS,
        "source_format": source_format,
        "options": opts.to_json(),
        "format": 1,
    }
    (out_dir / "render.json").write_text(json.dumps(render, indent=1))


def summarize(result: IngestResult) -> dict[str, Any]:
    """Counts for the CLI and ``exp show``: scans, slices per modality/plane and split, skips."""
    s = result.slices
    planes = s["plane"].astype(object).where(s["plane"].notna(), "image") if len(s) else s["plane"]  # 2-D: no plane
    by_plane = (
        {f"{m}/{p}": int(c) for (m, p), c in s.assign(plane=planes).groupby(["modality", "plane"]).size().items()}
        if len(s)
        else {}
    )
    by_split = {str(k): int(v) for k, v in s["split"].value_counts().items()} if len(s) else {}
    reasons: dict[str, int] = {}  # a scan with several problems counts under each
    for r in result.skips:
        for problem in str(r["reason"]).split("; "):
            kind = problem.split(":")[0].split(" (")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
    seconds = max(result.seconds, 1e-9)
    return {
        "scans_read": result.scans_read,
        "slices": int(len(s)),
        "slices_by_modality_plane": by_plane,
        "slices_by_split": by_split,
        "structures": len(result.vocab),
        "skipped": len(result.skips),
        "skipped_by_reason": reasons,
        "skipped_scans": [dict(r) for r in result.skips[:50]],
        "volumes_indexed": result.volumes_indexed,
        "volumes_resumed": result.volumes_resumed,
        "seconds": round(result.seconds, 3),
        "volumes_per_s": round(result.volumes_indexed / seconds, 3),
        "slices_per_s": round(result.slices_indexed / seconds, 1),
    }


def _mp_context():
    """Fork where available: workers start instantly and scripts need no ``__main__`` guard.

    Workers only run numpy/nibabel code, so forking a parent that imported torch or duckdb is safe.
    """
    import multiprocessing as mp

    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _relative_to_artifacts(root: Path, out_dir: Path) -> str:
    """The dataset folder relative to the artifacts root (``<artifacts>/slices/<key>/../..``).

    ``out_dir`` is the stage's temporary folder (``<artifacts>/slices/.tmp/<key>``) or, for
    ``data ingest --out``, the finished folder itself. Stored beside the absolute root so that a
    moved project folder (data and artifacts moved together) still renders its slices.
    """
    folder = Path(out_dir).resolve()
    anchor = folder.parent.parent.parent if folder.parent.name == ".tmp" else folder.parent.parent
    return os.path.relpath(Path(root).resolve(), anchor)

"""The ``slices`` stage: index a dataset (TotalSegmentator layout, manifest or DICOM folder) into slices.

``run_slices(ctx)`` makes sure the dataset exists (writing the phantom when the spec asks), runs
the ingest with ``ctx.work_dir`` holding one committed part per volume (so a killed run resumes at
the next volume), writes the index files into ``ctx.out_dir`` and returns the rows of the
registry tables ``slices``, ``slice_structures`` and ``ingest_skips`` plus count metrics.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from medsae.data.build import REGISTRY_SLICE_COLUMNS, IngestResult, run_ingest, slice_table
from medsae.data.config import DataSpec
from medsae.data.totalsegmentator import ensure_dataset
from medsae.stage import Metric, StageContext, StageResult

CODE_VERSION = "1"


def run_slices(ctx: StageContext) -> StageResult:
    """Stage entry point (see module docstring)."""
    data = ctx.section(DataSpec)
    root = ensure_dataset(data)
    result = run_ingest(root, data, ctx.out_dir, ctx.work_dir, progress=ctx.progress)
    return StageResult(
        metrics=ingest_metrics(result),
        tables=registry_tables(result),
        summary=result.summary,
        device="cpu",
    )


def registry_tables(result: IngestResult) -> dict[str, Any]:
    """Rows for the registry tables ``slices``, ``slice_structures`` and ``ingest_skips``."""
    slices = slice_table(result.slices, REGISTRY_SLICE_COLUMNS)
    structures = pa.table(
        {
            "slice_id": pa.array(result.structures["slice_id"].to_numpy(), pa.int64()),
            "structure": pa.array(result.structures["structure"].astype(str).to_numpy(), pa.string()),
            "pixels": pa.array(result.structures["pixels"].to_numpy(), pa.int32()),
        }
    )
    skips = [{"modality": r["modality"], "image_id": r["image_id"], "reason": r["reason"]} for r in result.skips]
    return {"slices": slices, "slice_structures": structures, "ingest_skips": skips}


def ingest_metrics(result: IngestResult) -> list[Metric]:
    """Counts as metric rows: scans, slices (per modality/plane as target, per split), skips.

    Timings stay in the summary (they differ between identical runs; metrics must not).
    """
    s = result.summary
    metrics = [
        Metric("n_scans", float(s["scans_read"])),
        Metric("n_slices", float(s["slices"]), split="all"),
        Metric("n_structures", float(s["structures"])),
        Metric("n_skipped", float(s["skipped"]), extra=s["skipped_by_reason"] or None),
    ]
    for target, count in s["slices_by_modality_plane"].items():
        metrics.append(Metric("n_slices", float(count), split="all", target=target))
    for split, count in s["slices_by_split"].items():
        metrics.append(Metric("n_slices", float(count), split=split))
    return metrics

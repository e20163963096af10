"""What a data source hands the ingest: scans to index, scans it cannot, and each scan's metadata.

Every source (TotalSegmentator layout, manifest table, DICOM folder) is turned into one
:class:`SourceScans` before any pixel is read; :mod:`medsae.data.build` indexes it the same way
whatever the source. Metadata is one flat dict per scan: the registry's standard columns
(:data:`STANDARD_META`, which SQL, probes and the explainer's metadata line read) plus the
source's further columns (``SourceScans.extra_columns``, carried into ``slices.parquet`` as text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from medsae.data.ingest import ScanTask
from medsae.data.splits import age_bin, normalise_sex

#: standard metadata columns of the slice index (registry ``slices`` table); age is a number
STANDARD_META = (
    "institute", "sex", "age", "age_bin", "study_type", "pathology", "pathology_location",
    "manufacturer", "scanner_model",
)  # fmt: skip


@dataclass
class SourceScans:
    """A dataset as a list of scans, before reading: see the module docstring."""

    format: str
    tasks: list[ScanTask]
    #: scans that cannot be indexed at all (no image file): modality, image_id, reason
    skips: list[dict[str, Any]]
    #: (modality, image_id) -> metadata columns (STANDARD_META and extra_columns)
    meta: dict[tuple[str, str], dict[str, Any]]
    #: every scan of the dataset, whatever the spec reads: modality, image_id, institute, sex, age[, subject]
    split_frame: pd.DataFrame
    extra_columns: list[str] = field(default_factory=list)
    #: dataset-level remarks for `medsae data check` (files left alone and why)
    notes: list[str] = field(default_factory=list)


def clean_text(value: object) -> str | None:
    """A metadata value as text, as written (the slice index keeps the source's spelling); None when
    missing or blank."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


def to_age(value: object) -> float | None:
    number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
    return None if pd.isna(number) else float(number)


def standard_meta(values: dict[str, Any]) -> dict[str, Any]:
    """The standard columns from raw values (``sex``/``age`` normalised, ``age_bin`` derived)."""
    out: dict[str, Any] = {c: clean_text(values.get(c)) for c in STANDARD_META}
    out["sex"] = normalise_sex(values.get("sex"))
    out["age"] = to_age(values.get("age"))
    binned = age_bin(pd.Series([out["age"]], dtype="float64")).iloc[0]
    out["age_bin"] = None if binned is None or (isinstance(binned, float) and math.isnan(binned)) else binned
    return out


def split_rows(scans: list[tuple[str, str, dict[str, Any], str | None]]) -> pd.DataFrame:
    """The split frame of ``(modality, image_id, metadata, subject)`` tuples."""
    return pd.DataFrame(
        {
            "modality": [s[0] for s in scans],
            "image_id": [s[1] for s in scans],
            "institute": [s[2].get("institute") for s in scans],
            "sex": [s[2].get("sex") for s in scans],
            "age": [s[2].get("age") for s in scans],
            "subject": pd.Series([s[3] for s in scans], dtype=object),
        }
    )

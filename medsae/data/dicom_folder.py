"""A folder of DICOM series as a data source (``data.format: dicom``).

Every image series under the folder (any depth; :func:`medsae.data.dicom.find_series`) is one
scan: a volume, or a 2-D picture when it holds a single image. Its ``image_id`` is a keyed
pseudonym of the SeriesInstanceUID and its ``subject`` one of the PatientID
(:mod:`medsae.data.pseudonym`), so scans of one patient share a split and no identifier reaches
the slice index, the registry or a prompt. The header fields of :data:`medsae.data.dicom.META_TAGS`
become metadata columns (Modality as ``modality``; StudyDescription as ``study_type``, which also
picks the CT window). A series that does not assemble is a recorded skip with every reason found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsae.data.config import DataSpec
from medsae.data.dicom import DicomSeries, find_series, series_meta
from medsae.data.ingest import ScanTask
from medsae.data.pseudonym import dataset_key, pseudonym
from medsae.data.scans import SourceScans, split_rows, standard_meta
from medsae.errors import MissingInputError

DATASET = "dicom"
#: header-derived metadata beyond the standard columns, in slices.parquet order
DICOM_EXTRA = ["subject", "kvp", "slice_thickness", "body_part"]


def series_scan(
    series: DicomSeries, root: Path, key: bytes, dataset: str = DATASET
) -> tuple[ScanTask, dict[str, Any], str | None]:
    """A series as a task (carrying its assembly problems), its metadata, and its subject pseudonym."""
    header = series_meta(series.header)
    subject = pseudonym(key, series.patient, "sub-") if series.patient else None
    meta = {**standard_meta(header), **{c: header.get(c) for c in DICOM_EXTRA if c != "subject"}, "subject": subject}
    task = ScanTask(
        modality=series.modality,
        image_id=pseudonym(key, series.key),
        dataset=dataset,
        root=str(root),
        volume=series.folder if not series.flat else series.files[0],
        study_type=meta.get("study_type"),
        problems=list(series.problems),
        reader="dicom2d" if series.flat else "dicom",
        files=list(series.files),
    )
    return task, meta, subject


def collect_dicom(root: Path, data: DataSpec, write: bool = True) -> SourceScans:
    """The scans of a DICOM folder; ``write=False`` (a dry run) creates no pseudonym key."""
    series, notes = find_series(root)
    if not series:
        raise MissingInputError(
            f"{root}: no DICOM image series found ({notes.files} files, {notes.not_dicom} not DICOM, "
            f"{notes.no_pixels} without pixel data)"
        )
    key = dataset_key(root, create=write)
    scans = [series_scan(s, root, key) for s in series]
    everything = split_rows([(t.modality, t.image_id, m, subj) for t, m, subj in scans])
    wanted = [s for s in scans if not data.modalities or s[0].modality in data.modalities]
    wanted.sort(key=lambda s: (s[0].modality, s[0].image_id))
    if data.max_scans:
        wanted = wanted[: data.max_scans]
    tasks, skips = [], []
    for task, _, _ in wanted:
        if task.problems:  # a series that does not assemble is not read
            reason = "; ".join(task.problems)
            skips.append({"modality": task.modality, "image_id": task.image_id, "reason": reason, "kind": task.reader})
        else:
            tasks.append(task)
    remarks = [f"{notes.files} files, {len(series)} image series"]
    if notes.not_dicom:
        remarks.append(f"{notes.not_dicom} files are not DICOM (left alone)")
    if notes.no_pixels:
        remarks.append(f"{notes.no_pixels} DICOM objects without pixel data (reports, segmentations...: left alone)")
    remarks += [f"unreadable DICOM file {u}" for u in notes.unreadable]
    return SourceScans(
        format="dicom",
        tasks=tasks,
        skips=skips,
        meta={(t.modality, t.image_id): m for t, m, _ in wanted},
        split_frame=everything,
        extra_columns=list(DICOM_EXTRA),
        notes=remarks,
    )

"""A manifest table: any collection of NIfTI volumes, DICOM series or 2-D images, one row per image.

``data.format: manifest`` reads ``<root>/<data.manifest>`` (CSV with ',' ';' or tab, or Parquet).
Column names are matched case-insensitively (README "Bring your own data"):

* ``image`` (required): a ``.nii`` / ``.nii.gz`` volume, a DICOM series (a folder holding one series,
  or one ``.dcm`` file), or a ``.png`` / ``.jpg`` / ``.jpeg`` / ``.tif`` / ``.tiff`` picture;
* ``mask``: a label map file (NIfTI or 2-D image) read with a label table, or a folder of binary
  masks named ``<structure>.nii.gz`` / ``.nii`` / ``.png`` / ``.tif``; no mask: every slice is kept;
* ``labels``: the row's label table (YAML / JSON, :mod:`medsae.data.labelmap`), else ``data.labels``;
* ``modality`` ('ct', 'mri', 'xr', ...): required except for DICOM, whose header has it;
* ``id``: the scan's id (default: the image's file name without suffix; DICOM: a pseudonym);
* ``subject``: the patient, stored only as a keyed pseudonym (scans of one subject share a split);
* standard metadata: ``institute`` (or ``site``), ``sex`` (or ``gender``), ``age``, ``study_type``,
  ``pathology``, ``pathology_location``, ``manufacturer``, ``scanner_model``;
* any other column: metadata carried into ``slices.parquet`` as text (probes, ``medsae export``).

Relative paths are taken from the manifest's folder. A row whose image is missing is a recorded
skip; a row with any other problem (missing or unreadable mask, bad label table, repeated id) is
still read, so that every problem is recorded, and skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from medsae.data.config import DataSpec, modality_name
from medsae.data.dicom_folder import DICOM_EXTRA, series_scan
from medsae.data.images2d import is_image_file
from medsae.data.ingest import ScanTask
from medsae.data.labelmap import LabelTableError, read_label_table
from medsae.data.pseudonym import dataset_key, pseudonym
from medsae.data.readers import MASK_SUFFIXES, is_nifti, strip_suffix
from medsae.data.scans import STANDARD_META, SourceScans, clean_text, split_rows, standard_meta
from medsae.errors import MedsaeError

DATASET = "manifest"
PATH_COLUMNS = ("image", "mask", "labels")
ALIASES = {"gender": "sex", "site": "institute", "patient": "subject", "patient_id": "subject", "image_id": "id"}
#: slice-index columns a manifest column must not shadow
RESERVED = {
    "slice_id", "slice_uid", "dataset", "plane", "axis", "idx", "position", "split", "age_bin",
    "body_region", "n_structures", "n_along", "ts_split", "slices_key",
}  # fmt: skip
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _column_name(raw: object) -> str:
    name = re.sub(r"[\s\-]+", "_", str(raw).strip().lower())
    return ALIASES.get(name, name)


def read_manifest(path: Path) -> pd.DataFrame:
    """The manifest as text columns with normalised names; a one-line :class:`MedsaeError` if unusable."""
    if not path.is_file():
        raise MedsaeError(f"{path}: manifest not found")
    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path)
        else:
            head = path.read_text(encoding="utf-8-sig", errors="replace").split("\n", 1)[0]
            sep = max([",", ";", "\t"], key=head.count)
            frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8-sig")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MedsaeError(f"{path}: cannot read the manifest: {first}") from None
    names = [_column_name(c) for c in frame.columns]
    for raw, name in zip(frame.columns, names, strict=True):
        if name in RESERVED:
            raise MedsaeError(f"{path}: column '{raw}' is reserved for the slice index (rename it, e.g. '{name}_1')")
        if not _NAME.match(name):
            raise MedsaeError(f"{path}: column '{raw}' is no usable name (letters, digits and '_', a letter first)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MedsaeError(f"{path}: column '{repeated[0]}' appears twice (aliases: gender=sex, site=institute)")
    frame.columns = names
    if "image" not in frame.columns:
        raise MedsaeError(f"{path}: the manifest has no 'image' column (found: {', '.join(names) or 'none'})")
    return frame.astype(object).where(frame.notna(), None)


def _under(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` when inside it, else absolute (as ScanTask paths are stored)."""
    full = Path(os.path.normpath(path))
    try:
        return full.relative_to(root).as_posix()
    except ValueError:
        return full.as_posix()


class _Row:
    """One manifest row turned into a scan: task fields, metadata and problems."""

    def __init__(self, number: int, values: dict[str, Any], base: Path, root: Path, data: DataSpec, key: bytes):
        self.number, self.values, self.base, self.root = number, values, base, root
        self.problems: list[str] = []
        self.task: ScanTask | None = None
        self.meta: dict[str, Any] = {}
        self.subject: str | None = None
        self._build(data, key)
        self.key = self._key()  # (modality, image_id), also for a row that is no scan

    def _field(self, column: str) -> str | None:
        """A structural value (path, modality, id, subject) without surrounding blanks."""
        text = clean_text(self.values.get(column))
        return None if text is None else text.strip()

    def _path(self, column: str) -> Path | None:
        text = self._field(column)
        if text is None:
            return None
        path = Path(os.path.expanduser(text))
        return path if path.is_absolute() else self.base / path

    def _build(self, data: DataSpec, key: bytes) -> None:
        image = self._path("image")
        modality = self._field("modality")
        if image is None:
            self._fail("no image path")
            return
        if not image.exists():
            self._fail(f"image missing: {_under(self.root, image)}")
            return
        dicom_meta: dict[str, Any] = {}
        if image.is_dir() or image.name.lower().endswith(".dcm"):
            task, dicom_meta, self.subject = self._dicom(image, key)
            if task is None:
                return
        elif is_nifti(image) or is_image_file(image):
            task = ScanTask(
                modality="", image_id=strip_suffix(image.name), dataset=DATASET, root=str(self.root),
                volume=_under(self.root, image), reader="nifti" if is_nifti(image) else "image2d",
            )  # fmt: skip
        else:
            self._fail(f"image {image.name}: not a NIfTI volume, DICOM series or PNG/JPEG/TIFF image")
            return
        if modality is not None:
            task.modality = modality_name(modality)
        if not task.modality:
            self.problems.append("no modality (fill the 'modality' column)")
            task.modality = "unknown"
        if self._field("id"):
            task.image_id = str(self._field("id"))
        subject = self._field("subject")
        if subject is not None:
            self.subject = pseudonym(key, subject, "sub-")
        self._masks(task, data)
        given = {k: v for k, v in self.values.items() if k not in PATH_COLUMNS and clean_text(v) is not None}
        self.meta = {**dicom_meta, **standard_meta({**dicom_meta, **given})}
        for column, value in self.values.items():
            if column not in (*PATH_COLUMNS, *STANDARD_META, "modality", "id", "subject"):
                self.meta[column] = clean_text(value)
        self.meta["subject"] = self.subject
        task.study_type = self.meta.get("study_type")
        task.problems = self.problems
        self.task = task

    def _dicom(self, image: Path, key: bytes) -> tuple[ScanTask | None, dict[str, Any], str | None]:
        from medsae.data.dicom import find_series, walk_files

        paths = list(walk_files(image)) if image.is_dir() else [image]
        found, _ = find_series(self.root, paths)  # file paths relative to the root ('../' when outside)
        if len(found) != 1:
            self._fail(f"image {image.name}: {len(found)} DICOM image series where one is expected")
            return None, {}, None
        task, meta, subject = series_scan(found[0], self.root, key, DATASET)
        task.volume = _under(self.root, image)
        self.problems.extend(task.problems)
        return task, meta, subject

    def _masks(self, task: ScanTask, data: DataSpec) -> None:
        mask = self._path("mask")
        if mask is None:
            return
        if not mask.exists():
            self.problems.append(f"mask missing: {_under(self.root, mask)}")
        elif mask.is_dir():
            for entry in sorted(mask.iterdir()):
                if entry.name.startswith(".") or not entry.name.lower().endswith(MASK_SUFFIXES):
                    continue
                name = strip_suffix(entry.name)
                if name in task.masks:
                    self.problems.append(f"two mask files for structure {name} in {mask.name}")
                task.masks[name] = _under(self.root, entry)
        else:
            table = self._path("labels") or (self.root / data.labels if data.labels else None)
            if table is None:
                self.problems.append(f"mask {mask.name} is a label map but no label table is given ('labels')")
                return
            try:
                task.labels = read_label_table(table)
            except LabelTableError as exc:
                self.problems.append(str(exc))
                return
            task.label_map = _under(self.root, mask)

    def _fail(self, problem: str) -> None:
        self.problems.append(problem)

    def _key(self) -> tuple[str, str]:
        if self.task is not None:
            return (self.task.modality, self.task.image_id)
        modality, image = self._field("modality"), self._field("image")
        ident = self._field("id") or (strip_suffix(Path(image).name) if image else f"row{self.number}")
        return (modality_name(modality) if modality else "unknown", ident)


def manifest_path(root: Path, data: DataSpec) -> Path:
    path = Path(os.path.expanduser(data.manifest))
    return path if path.is_absolute() else root / path


def collect_manifest(root: Path, data: DataSpec, write: bool = True) -> SourceScans:
    """The scans a manifest lists; ``write=False`` (a dry run) creates no pseudonym key."""
    path = manifest_path(root, data)
    frame = read_manifest(path)
    key = dataset_key(root, create=write and ("subject" in frame.columns or _has_dicom(frame)))
    rows = [_Row(i + 1, values, path.parent, root, data, key) for i, values in enumerate(frame.to_dict("records"))]
    first_row: dict[tuple[str, str], int] = {}
    for row in rows:
        if row.key in first_row:  # never indexed: its part file would replace the first row's
            row.problems.append(f"repeats the id of row {first_row[row.key]} (give each scan its own 'id')")
            row.task = None
        else:
            first_row[row.key] = row.number
    everything = split_rows([(*r.key, r.meta or _raw_meta(r.values), r.subject) for r in rows])
    everything = everything.drop_duplicates(["modality", "image_id"])
    wanted = [r for r in rows if not data.modalities or r.key[0] in data.modalities]
    wanted.sort(key=lambda r: (r.key, r.number))
    if data.max_scans:
        wanted = wanted[: data.max_scans]
    tasks, skips = [], []
    for row in wanted:
        if row.task is None:
            skips.append({"modality": row.key[0], "image_id": row.key[1], "reason": "; ".join(row.problems)})
        else:
            tasks.append(row.task)
    extra = [c for c in frame.columns if c not in (*PATH_COLUMNS, *STANDARD_META, "modality", "id", "subject")]
    if any(r.task is not None and r.task.reader.startswith("dicom") for r in rows):
        extra += [c for c in DICOM_EXTRA if c not in extra]
    elif any(r.subject for r in rows):
        extra = ["subject", *extra]
    return SourceScans(
        format="manifest",
        tasks=tasks,
        skips=skips,
        meta={r.key: r.meta for r in wanted if r.task is not None},
        split_frame=everything,
        extra_columns=extra,
        notes=[f"{path.name}: {len(frame)} rows"],
    )


def _has_dicom(frame: pd.DataFrame) -> bool:
    return any(str(v).lower().endswith(".dcm") or not os.path.splitext(str(v))[1] for v in frame["image"] if v)


def _raw_meta(values: dict[str, Any]) -> dict[str, Any]:
    return standard_meta({k: v for k, v in values.items() if k not in PATH_COLUMNS})

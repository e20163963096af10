"""`medsae data check`: what an ingest would read, and every problem found, without writing anything.

The check lists the source's scans exactly as the ingest would (:func:`medsae.data.sources.collect_scans`
with ``write=False``: no split table, no pseudonym key, no part files), then reads the headers of
every image and mask (NIfTI headers, image sizes, DICOM headers; no pixel data is decoded) to find
what the ingest would skip: missing or unreadable files, masks on a grid that does not cover the
image, 2-D masks of another size, label tables that cannot be used, DICOM series that do not
assemble. A problem only visible in the pixels (a truncated compressed volume, label values missing
from the table) shows at ingest, recorded as the scan's skip reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsae.data.config import DataSpec
from medsae.data.ingest import ScanTask
from medsae.data.readers import FLAT_READERS, is_nifti
from medsae.data.slicing import grid_map
from medsae.data.sources import collect_scans

FORMATS = ("totalsegmentator", "manifest", "dicom")


@dataclass
class ScanCheck:
    """One scan as the check sees it."""

    modality: str
    image_id: str
    kind: str  # reader: nifti, dicom, dicom2d, image2d; 'missing' when there is no image
    segmentation: str  # 'masks', 'label map' or 'none'
    problems: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    """What `medsae data check` prints."""

    root: Path
    format: str
    scans: list[ScanCheck]
    notes: list[str]

    @property
    def problems(self) -> list[ScanCheck]:
        return [s for s in self.scans if s.problems]

    def summary(self) -> list[dict[str, Any]]:
        """Per modality and kind: scans, their segmentations, how many have a problem (an ingest skips them)."""
        counts: Counter[tuple[str, str]] = Counter((s.modality, s.kind) for s in self.scans)
        bad: Counter[tuple[str, str]] = Counter((s.modality, s.kind) for s in self.scans if s.problems)
        rows = []
        for (m, k), n in sorted(counts.items()):
            segs = Counter(s.segmentation for s in self.scans if (s.modality, s.kind) == (m, k))
            segmentation = ", ".join(f"{name} {c}" for name, c in sorted(segs.items()))
            rows.append({"modality": m, "kind": k, "scans": n, "segmentation": segmentation,
                         "to_ingest": n - bad[(m, k)], "problems": bad[(m, k)]})  # fmt: skip
        return rows


def detect_format(path: Path) -> tuple[Path, str, str | None]:
    """(root, format, manifest name) of a path given on the command line: a manifest file, a
    TotalSegmentator folder, a folder with ``manifest.csv``/``.parquet``, else a DICOM folder."""
    from medsae.data.totalsegmentator import DATASETS

    if path.is_file():
        return path.parent, "manifest", path.name
    if any((path / name).is_dir() for name in DATASETS.values()):
        return path, "totalsegmentator", None
    for name in ("manifest.csv", "manifest.parquet", "manifest.tsv"):
        if (path / name).is_file():
            return path, "manifest", name
    return path, "dicom", None


def _segmentation(task: ScanTask) -> str:
    if task.label_map is not None:
        return "label map"
    return "masks" if task.masks else "none"


def _header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine from a file's header (NIfTI) or size (2-D image: ``(1, rows, cols)``)."""
    if is_nifti(path):
        import nibabel as nib

        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        return shape, img.affine
    from PIL import Image

    with Image.open(path) as img:
        return (1, img.height, img.width), np.eye(4)


def _file_problems(root: Path, task: ScanTask) -> list[str]:
    """Header-level problems of a scan's image and masks (no pixel data read)."""
    if task.reader in ("dicom", "dicom2d"):
        return []  # discovery read every header already
    try:
        shape, affine = _header(root / task.volume)
    except Exception as exc:
        return [f"cannot read image {Path(task.volume).name}: {type(exc).__name__}: {str(exc).strip()[:160]}"]
    if task.reader == "nifti" and len(shape) != 3:
        return [f"volume is not 3-D (shape {shape})"]
    problems = []
    masks = dict(task.masks)
    if task.label_map is not None:
        masks["label map"] = task.label_map
    for name, rel in sorted(masks.items()):
        try:
            mask_shape, mask_affine = _header(root / rel)
        except Exception as exc:
            problems.append(f"cannot read mask {name}: {type(exc).__name__}: {str(exc).strip()[:120]}")
            continue
        if mask_shape == shape:
            continue
        flat = task.reader in FLAT_READERS
        if flat or len(mask_shape) != 3 or grid_map(mask_shape, mask_affine, shape, affine) is None:
            problems.append(f"mask {name} has shape {mask_shape}, image has {shape}, and its grid does not cover it")
    return problems


def check_dataset(root: Path, data: DataSpec) -> CheckReport:
    """Dry run of an ingest of ``root`` with the section ``data`` (see the module docstring)."""
    source = collect_scans(root, data, write=False)
    scans = [
        ScanCheck(s["modality"], s["image_id"], s.get("kind", "missing"), "none", [s["reason"]]) for s in source.skips
    ]
    for task in source.tasks:
        problems = [*task.problems, *_file_problems(root, task)]
        scans.append(ScanCheck(task.modality, task.image_id, task.reader, _segmentation(task), problems))
    scans.sort(key=lambda s: (s.modality, s.image_id))
    return CheckReport(root, source.format, scans, source.notes)

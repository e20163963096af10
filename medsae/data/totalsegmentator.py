"""The TotalSegmentator folder layout: finding scans, reading meta.csv, listing masks.

Layout (study-method.md §1.1)::

    ROOT/CT_Dataset_v201/meta.csv            ';'-separated, one row per scan
    ROOT/CT_Dataset_v201/sNNNN/ct.nii.gz
    ROOT/CT_Dataset_v201/sNNNN/segmentations/<structure>.nii.gz
    ROOT/MRI_Dataset_v200/...  (mri.nii.gz)

Either dataset folder may be absent. The scan key is ``(modality, image_id)``: the same ``sNNNN``
exists in both sets and names different patients. Every sub-folder is a scan (meta is joined by
``image_id``, missing meta gives nulls); a meta.csv row without a volume becomes a recorded skip.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from medsae.errors import MedsaeError, MissingInputError

DATASETS = {"ct": "CT_Dataset_v201", "mri": "MRI_Dataset_v200"}
VOLUME_FILE = {"ct": "ct.nii.gz", "mri": "mri.nii.gz"}
MASK_SUFFIX = ".nii.gz"


@dataclass
class ScanRef:
    """One scan found on disk (or only in meta.csv, then ``volume`` does not exist)."""

    modality: str
    image_id: str
    dataset: str  # folder name, e.g. 'CT_Dataset_v201'
    volume: Path
    meta: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, Path] = field(default_factory=dict)  # structure -> file
    has_segmentations: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.modality, self.image_id)


def read_meta(path: Path) -> pd.DataFrame:
    """A meta.csv as strings (``image_id`` first); an empty frame when the file is absent."""
    if not path.is_file():
        return pd.DataFrame({"image_id": pd.Series(dtype=str)})
    try:
        frame = pd.read_csv(
            path, sep=";", dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8-sig"
        )
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise MedsaeError(f"{path}: cannot read meta.csv: {str(exc).splitlines()[0]}") from None
    if "image_id" not in frame.columns:
        raise MedsaeError(f"{path}: meta.csv has no 'image_id' column (is it ';'-separated?)")
    frame["image_id"] = frame["image_id"].str.strip()
    return frame.drop_duplicates("image_id", keep="first")


def present_modalities(root: Path) -> list[str]:
    """Modalities whose dataset folder exists under ``root``."""
    return [m for m, name in DATASETS.items() if (root / name).is_dir()]


def discover(root: str | Path, modalities: list[str] | tuple[str, ...] = ("ct", "mri")) -> list[ScanRef]:
    """Every scan of the requested modalities, sorted by (modality, image_id).

    Lists mask files (``segmentations/*.nii.gz``) without opening them: cheap even for the full
    dataset. Scans whose volume file is missing are returned too (the caller records the skip).
    """
    root = Path(root)
    scans: list[ScanRef] = []
    for modality in sorted(modalities):
        name = DATASETS[modality]
        folder = root / name
        if not folder.is_dir():
            continue
        meta = read_meta(folder / "meta.csv")
        rows = {r["image_id"]: r for r in meta.to_dict("records")}
        ids = {e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")}
        for image_id in sorted(ids | set(rows)):
            scan_dir = folder / image_id
            row = {k: v for k, v in rows.get(image_id, {}).items() if k != "image_id" and not pd.isna(v)}
            ref = ScanRef(modality, image_id, name, scan_dir / VOLUME_FILE[modality], row)
            seg = scan_dir / "segmentations"
            if seg.is_dir():
                ref.has_segmentations = True
                for e in os.scandir(seg):
                    if e.name.endswith(MASK_SUFFIX) and not e.name.startswith("."):
                        ref.masks[e.name[: -len(MASK_SUFFIX)]] = Path(e.path)
            scans.append(ref)
    return scans


def expected_masks(scans: list[ScanRef]) -> dict[str, set[str]]:
    """Per modality, the mask names present in at least half of its scans with a segmentations folder.

    The real dataset ships every structure's mask for every scan (empty ones included), so a scan
    lacking one of these is incomplete and is skipped rather than silently given zero areas.
    """
    out: dict[str, set[str]] = {}
    for modality in {s.modality for s in scans}:
        group = [s for s in scans if s.modality == modality and s.has_segmentations]
        counts: dict[str, int] = {}
        for s in group:
            for name in s.masks:
                counts[name] = counts.get(name, 0) + 1
        out[modality] = {n for n, c in counts.items() if 2 * c >= len(group)}
    return out


def ensure_dataset(params: dict[str, Any]) -> Path:
    """The dataset root of a data section; writes the phantom first when ``params['phantom']`` is set.

    Raises :class:`MissingInputError` naming the folder and what was expected in it.
    """
    root = Path(str(params.get("root", ""))).expanduser()
    phantom = params.get("phantom")
    if phantom:
        from medsae.data.phantom import write_phantom

        write_phantom(
            root,
            subjects=int(phantom.get("subjects", 12)),
            seed=int(phantom.get("seed", 0)),
            mri_fraction=float(phantom.get("mri_fraction", 0.34)),
            shape=tuple(phantom.get("shape", (64, 64, 80))),
        )
    if not root.is_dir():
        raise MissingInputError(
            f"{root}: data folder not found (expected a TotalSegmentator folder with "
            f"{DATASETS['ct']}/ and/or {DATASETS['mri']}/, or set data.phantom to generate one)"
        )
    wanted = [m for m in params.get("modalities", ["ct", "mri"]) if m in DATASETS]
    if not any((root / DATASETS[m]).is_dir() for m in wanted):
        expected = " and/or ".join(f"{DATASETS[m]}/" for m in wanted)
        raise MissingInputError(
            f"{root}: no TotalSegmentator dataset here (expected {expected} with meta.csv)"
        )
    return root


def dataset_manifest(root: str | Path) -> str:
    """sha256 over the sorted relative paths and sizes of the dataset files (stat only, no reads).

    Only the two dataset folders count (hidden files and medsae's own ``.medsae/`` are ignored),
    so writing split tables or caches next to the data does not change the digest.
    """
    root = Path(root)
    entries: list[str] = []
    for name in sorted(DATASETS.values()):
        base = root / name
        if not base.is_dir():
            continue
        stack = [base]
        while stack:
            folder = stack.pop()
            with os.scandir(folder) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir(follow_symlinks=True):
                        stack.append(Path(e.path))
                    else:
                        rel = Path(e.path).relative_to(root).as_posix()
                        entries.append(f"{rel}\t{e.stat().st_size}")
    digest = hashlib.sha256()
    for line in sorted(entries):
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()

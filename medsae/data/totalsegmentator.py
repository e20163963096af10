"""The TotalSegmentator folder layout: finding scans, reading meta.csv, listing masks.

Layout (docs/method.md#dataset-layout)::

    ROOT/CT_Dataset_v201/meta.csv            ';'-separated, one row per scan
    ROOT/CT_Dataset_v201/sNNNN/ct.nii.gz
    ROOT/CT_Dataset_v201/sNNNN/segmentations/<structure>.nii.gz
    ROOT/MRI_Dataset_v200/...  (mri.nii.gz)

Either dataset folder may be absent. The scan key is ``(modality, image_id)``: the same ``sNNNN``
exists in both sets and names different patients. Every sub-folder is a scan (meta is joined by
``image_id``, missing meta gives nulls); a meta.csv row without a volume becomes a recorded skip.

Symbolic links are followed (datasets often live elsewhere), but never into a loop: a link that
dangles, cycles or points at a folder containing it becomes a recorded problem of its scan (or a
one-line error for a whole dataset folder), and the manifest walk visits each folder once.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from medsae.data.config import DataSpec, PhantomSpec
from medsae.data.ingest import ScanTask
from medsae.data.scans import SourceScans, clean_text, split_rows, standard_meta
from medsae.errors import MedsaeError, MissingInputError
from medsae.stage import as_section, check_writable_folder

DATASETS = {"ct": "CT_Dataset_v201", "mri": "MRI_Dataset_v200"}
#: meta.csv columns carried into slices.parquet as text besides the standard ones (``split`` as ``ts_split``)
EXTRA_META = [
    "kvp", "magnetic_field_strength", "scanning_sequence", "echo_time", "repetition_time",
    "slice_thickness", "source",
]  # fmt: skip
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
    #: problems found without reading any file (bad symbolic links), in the order found
    problems: list[str] = field(default_factory=list)
    #: structures whose mask file is a bad link (recorded in ``problems``, not counted as missing)
    bad_masks: set[str] = field(default_factory=set)
    #: False when the scan folder itself is a bad link: nothing inside it was looked at
    folder_ok: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return (self.modality, self.image_id)


def read_meta(path: Path) -> pd.DataFrame:
    """A meta.csv as strings (``image_id`` first); an empty frame when the file is absent."""
    if not path.is_file():
        return pd.DataFrame({"image_id": pd.Series(dtype=str)})
    try:
        frame = pd.read_csv(path, sep=";", dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise MedsaeError(f"{path}: cannot read meta.csv: {str(exc).splitlines()[0]}") from None
    if "image_id" not in frame.columns:
        raise MedsaeError(f"{path}: meta.csv has no 'image_id' column (is it ';'-separated?)")
    frame["image_id"] = frame["image_id"].str.strip()
    return frame.drop_duplicates("image_id", keep="first")


def link_problem(path: str | Path) -> str | None:
    """Why the symbolic link ``path`` cannot be followed, or None (not a link, or a sound one).

    'dangling symlink' (target missing), 'symlink loop' (links that cycle) or 'symlink loop
    (points to its own folder X)' for a folder link to itself or to one of its ancestors, which
    would make any walk below it endless.
    """
    path = Path(path)
    if not path.is_symlink():
        return None
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        return "dangling symlink"
    except RuntimeError:  # Python < 3.13 reports a link cycle this way
        return "symlink loop"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        return f"unreadable symlink ({os.strerror(exc.errno) if exc.errno else exc})"
    if target.is_dir():
        try:
            here = path.parent.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if target == here or target in here.parents:
            return f"symlink loop (points to its own folder {target.name or target})"
    return None


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
        ids: set[str] = set()
        bad_folders: dict[str, str] = {}
        for e in _entries(folder):
            if e.is_symlink() and (problem := link_problem(e.path)):
                bad_folders[e.name] = f"scan folder {e.name}: {problem}"
            elif _is_dir(e):
                ids.add(e.name)
        for image_id in sorted(ids | set(rows) | set(bad_folders)):
            scan_dir = folder / image_id
            row = {k: v for k, v in rows.get(image_id, {}).items() if k != "image_id" and not pd.isna(v)}
            ref = ScanRef(modality, image_id, name, scan_dir / VOLUME_FILE[modality], row)
            if image_id in bad_folders:
                ref.problems.append(bad_folders[image_id])
                ref.folder_ok = False
            else:
                _find_files(ref, scan_dir)
            scans.append(ref)
    return scans


def _entries(folder: Path) -> list[os.DirEntry]:
    """Visible entries of a folder by name; an unreadable folder has none."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:
        return []


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _find_files(ref: ScanRef, scan_dir: Path) -> None:
    """Fill the masks of one scan and record its bad links (volume, segmentations folder, masks)."""
    problem = link_problem(ref.volume)
    if problem:
        ref.problems.append(f"volume {ref.volume.name}: {problem}")
    seg = scan_dir / "segmentations"
    problem = link_problem(seg)
    if problem:
        ref.problems.append(f"segmentations folder: {problem}")
        return
    if not seg.is_dir():
        return
    ref.has_segmentations = True
    for e in _entries(seg):
        if not e.name.endswith(MASK_SUFFIX):
            continue
        structure = e.name[: -len(MASK_SUFFIX)]
        problem = link_problem(e.path) if e.is_symlink() else None
        if problem:
            ref.problems.append(f"mask {e.name}: {problem}")
            ref.bad_masks.add(structure)
        else:
            ref.masks[structure] = Path(e.path)


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


def _problems(root: Path, scan: ScanRef, expected: set[str]) -> list[str]:
    """Everything wrong with a scan that shows without reading a file (links found by discover first)."""
    problems = list(scan.problems)
    if not scan.folder_ok:
        return problems
    # a path that is a link but not a file or folder is a bad link, already in scan.problems
    if not scan.volume.is_file() and not scan.volume.is_symlink():
        problems.append(f"volume missing: {scan.volume.relative_to(root).as_posix()}")
    seg = scan.volume.parent / "segmentations"
    if not scan.has_segmentations and not seg.is_symlink():
        problems.append("no segmentations folder")
    elif scan.has_segmentations:
        missing = sorted(expected - set(scan.masks) - scan.bad_masks)
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            problems.append(f"missing masks: {', '.join(missing[:5])}{more}")
    return problems


def scan_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A meta.csv row as the slice index's metadata columns (``gender`` -> ``sex``, ``split`` -> ``ts_split``)."""
    out = standard_meta({**meta, "sex": meta.get("gender")})
    out["ts_split"] = clean_text(meta.get("split"))
    for key in EXTRA_META:
        out[key] = None if meta.get(key) is None else str(meta.get(key))
    return out


def collect_totalsegmentator(root: Path, data: DataSpec) -> SourceScans:
    """The scans of a TotalSegmentator folder: tasks with the problems visible before reading, skips, meta."""
    all_scans = discover(root, present_modalities(root))
    wanted = [s for s in all_scans if not data.modalities or s.modality in data.modalities]
    expected = expected_masks(wanted)
    scans = wanted[: data.max_scans] if data.max_scans else wanted
    tasks, skips = [], []
    for s in scans:
        problems = _problems(root, s, expected.get(s.modality, set()))
        if not s.volume.is_file():
            reason = "; ".join(problems) or "volume missing"
            skips.append({"modality": s.modality, "image_id": s.image_id, "reason": reason})
            continue
        tasks.append(
            ScanTask(
                modality=s.modality,
                image_id=s.image_id,
                dataset=s.dataset,
                root=str(root),
                volume=s.volume.relative_to(root).as_posix(),
                masks={k: v.relative_to(root).as_posix() for k, v in s.masks.items()},
                study_type=s.meta.get("study_type"),
                problems=problems,
            )
        )
    split_frame = split_rows(
        [(s.modality, s.image_id, {**s.meta, "sex": s.meta.get("gender")}, None) for s in all_scans]
    )
    return SourceScans(
        format="totalsegmentator",
        tasks=tasks,
        skips=skips,
        meta={s.key: scan_meta(s.meta) for s in scans},
        split_frame=split_frame.drop(columns="subject"),
        extra_columns=["ts_split", *EXTRA_META],
    )


def _phantom_args(phantom: PhantomSpec) -> dict[str, Any]:
    """Keyword arguments of :func:`medsae.data.phantom.write_phantom` for a ``data.phantom`` section."""
    return dict(subjects=phantom.subjects, seed=phantom.seed, mri_fraction=phantom.mri_fraction, shape=phantom.shape)


def _other_layout(root: Path) -> bool:
    """Whether ``root`` is digested as a whole (see :func:`dataset_manifest`)."""
    names = set(DATASETS.values())
    if not any((root / n).is_dir() or (root / n).is_symlink() for n in names):
        return root.is_dir()
    for folder, dirs, files in os.walk(root):
        top = Path(folder) == root
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (top and d in names)]
        if any(f.lower().endswith((".csv", ".tsv", ".parquet")) for f in files if not f.startswith(".")):
            return True
    return False


def check_dataset_writable(data: DataSpec | Mapping[str, Any]) -> None:
    """One line naming the folder when the data section generates a phantom that it could not write.

    A complete phantom with the same parameters is reused and needs no write access.
    """
    data = as_section(DataSpec, data)
    if data.phantom is None:
        return
    from medsae.data.phantom import phantom_is_complete

    root = Path(data.root).expanduser()
    if not phantom_is_complete(root, **_phantom_args(data.phantom)):
        check_writable_folder(root, "the phantom data folder")


def ensure_dataset(data: DataSpec | Mapping[str, Any]) -> Path:
    """The dataset root of a ``data:`` section; writes the phantom first when the section asks for one.

    ``data`` may be plain data (scripts); it is validated as a :class:`DataSpec` first. Raises
    :class:`MissingInputError` naming the folder and what was expected in it.
    """
    data = as_section(DataSpec, data)
    root = Path(data.root).expanduser()
    if data.phantom is not None:
        from medsae.data.phantom import write_phantom

        write_phantom(root, **_phantom_args(data.phantom))  # probes the folder first: one line if not writable
    if data.format != "totalsegmentator":
        from medsae.data.sources import check_source

        problem = link_problem(root)
        if problem:
            raise MissingInputError(f"{root}: data folder is a {problem}")
        check_source(root, data)
        return root
    if not root.is_dir():
        problem = link_problem(root)
        raise MissingInputError(
            f"{root}: data folder is a {problem}"
            if problem
            else f"{root}: data folder not found (expected a TotalSegmentator folder with "
            f"{DATASETS['ct']}/ and/or {DATASETS['mri']}/, or set data.phantom to generate one)"
        )
    wanted = [m for m in (data.modalities or DATASETS) if m in DATASETS]
    for m in wanted:
        problem = link_problem(root / DATASETS[m])
        if problem:
            raise MissingInputError(f"{root / DATASETS[m]}: dataset folder is a {problem}")
    if not any((root / DATASETS[m]).is_dir() for m in wanted):
        expected = " and/or ".join(f"{DATASETS[m]}/" for m in wanted)
        raise MissingInputError(f"{root}: no TotalSegmentator dataset here (expected {expected} with meta.csv)")
    return root


def dataset_manifest(root: str | Path) -> str:
    """sha256 over the sorted relative paths and sizes of the dataset files (stat only, no reads).

    Only the two dataset folders count (hidden files and medsae's own ``.medsae/`` are ignored),
    so writing split tables or caches next to the data does not change the digest. Links are
    followed, each folder is walked once (by device and inode), and a link that dangles or loops
    enters the digest as its path and problem instead of a size: the walk always ends and never
    raises for what it finds on disk.

    A root without a TotalSegmentator dataset folder, or with a table (.csv, .tsv, .parquet: a
    manifest) outside them, is a manifest or DICOM dataset: :func:`medsae.data.sources.folder_digest`
    names all of its files (and a manifest's content).
    """
    root = Path(root)
    if _other_layout(root):
        from medsae.data.sources import folder_digest

        return folder_digest(root)
    entries: list[str] = []
    for name in sorted(DATASETS.values()):
        base = root / name
        problem = link_problem(base)
        if problem:
            entries.append(f"{name}\t{problem}")
            continue
        if not base.is_dir():
            continue
        visited: set[tuple[int, int]] = set()
        stack = [base]
        while stack:
            folder = stack.pop()
            rel_folder = folder.relative_to(root).as_posix()
            try:
                st = folder.stat()
            except OSError as exc:
                entries.append(f"{rel_folder}\tunreadable ({exc.strerror})")
                continue
            if (st.st_dev, st.st_ino) in visited:
                entries.append(f"{rel_folder}\tlink to a folder listed already")
                continue
            visited.add((st.st_dev, st.st_ino))
            for e in _entries(folder):
                rel = Path(e.path).relative_to(root).as_posix()
                problem = link_problem(e.path) if e.is_symlink() else None
                if problem:
                    entries.append(f"{rel}\t{problem}")
                    continue
                try:
                    if e.is_dir():
                        stack.append(Path(e.path))
                        continue
                    size = e.stat().st_size
                except OSError as exc:
                    entries.append(f"{rel}\tunreadable ({exc.strerror})")
                    continue
                entries.append(f"{rel}\t{size}")
    digest = hashlib.sha256()
    for line in sorted(entries):
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()

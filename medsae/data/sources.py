"""The data sources behind ``data.format``: their scans, a check that they exist, a digest of their files.

* ``totalsegmentator`` — :mod:`medsae.data.totalsegmentator` (the default);
* ``manifest`` — :mod:`medsae.data.manifest` (one row per image, any format);
* ``dicom`` — :mod:`medsae.data.dicom_folder` (every DICOM series under the root).

The slices stage key names the dataset by :func:`folder_digest` (TotalSegmentator keeps its own
digest of its two dataset folders): relative paths and sizes of every visible file under the root,
the content of its tables and label tables, and the paths and sizes of the files a manifest names
outside the root, so that editing a manifest or a label table, or replacing an image, gives a new
key. Stat calls and small reads only; the walk never follows links to folders.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medsae.data.config import DataSpec
from medsae.data.scans import SourceScans
from medsae.errors import MedsaeError, MissingInputError
from medsae.stage import as_section

#: files whose content (not only size) enters the digest: manifests and label tables
_CONTENT_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".json", ".yaml", ".yml")
_CONTENT_LIMIT = 64 * 2**20


def collect_scans(root: Path, data: DataSpec, write: bool = True) -> SourceScans:
    """The scans of the dataset at ``root`` in the section's format (``write=False``: create no file)."""
    if data.format == "manifest":
        from medsae.data.manifest import collect_manifest

        return collect_manifest(root, data, write)
    if data.format == "dicom":
        from medsae.data.dicom_folder import collect_dicom

        return collect_dicom(root, data, write)
    from medsae.data.totalsegmentator import collect_totalsegmentator

    return collect_totalsegmentator(root, data)


def check_source(root: Path, data: DataSpec | Mapping[str, Any]) -> None:
    """One line (:class:`MissingInputError`) when a manifest or DICOM source is not where the spec says."""
    data = as_section(DataSpec, data)
    if not root.is_dir():
        what = "the folder of the manifest" if data.format == "manifest" else "a folder of DICOM series"
        raise MissingInputError(f"{root}: data folder not found (expected {what})")
    if data.format == "manifest":
        from medsae.data.manifest import manifest_path

        path = manifest_path(root, data)
        if not path.is_file():
            raise MissingInputError(f"{path}: manifest not found (data.manifest names it, relative to data.root)")
        if path.suffix.lower() not in (".csv", ".tsv", ".txt", ".parquet"):
            raise MedsaeError(f"{path}: a manifest is a .csv, .tsv or .parquet file")


def _stat_line(rel: str, path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        return f"{rel}\tunreadable ({exc.strerror})"
    if path.suffix.lower() in _CONTENT_SUFFIXES and st.st_size <= _CONTENT_LIMIT:
        try:
            return f"{rel}\t{st.st_size}\t{hashlib.sha256(path.read_bytes()).hexdigest()}"
        except OSError as exc:
            return f"{rel}\tunreadable ({exc.strerror})"
    return f"{rel}\t{st.st_size}"


def _walk(base: Path, label: str) -> list[str]:
    lines = []
    for folder, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            lines.append(_stat_line(f"{label}/{path.relative_to(base).as_posix()}", path))
    return lines


def _outside_files(root: Path, table: Path) -> list[str]:
    """Digest lines of the files a manifest-like table names outside ``root``."""
    try:
        from medsae.data.manifest import PATH_COLUMNS, read_manifest

        frame = read_manifest(table)
    except Exception:
        return []  # not a manifest: its content is in the digest already
    lines: list[str] = []
    seen: set[Path] = set()
    for column in (c for c in PATH_COLUMNS if c in frame.columns):
        for value in frame[column].dropna():
            path = Path(os.path.normpath(table.parent / os.path.expanduser(str(value).strip())))
            if path in seen or path == root or root in path.parents:
                continue
            seen.add(path)
            lines.extend(_walk(path, path.as_posix()) if path.is_dir() else [_stat_line(path.as_posix(), path)])
    return lines


def folder_digest(root: str | Path) -> str:
    """sha256 naming the files of a manifest or DICOM dataset (see the module docstring)."""
    root = Path(root).resolve()
    lines = _walk(root, ".")
    for line in list(lines):
        rel = line.split("\t", 1)[0][2:]
        if rel.lower().endswith((".csv", ".tsv", ".parquet")):
            lines.extend(_outside_files(root, root / rel))
    digest = hashlib.sha256()
    for line in sorted(set(lines)):
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()

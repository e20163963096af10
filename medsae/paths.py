"""Where things are: the one place that turns stored and written paths into real ones.

Two kinds of relative path exist in medsae, each with one anchor:

* **Paths in the registry** (``stages.artifact_dir``, ``experiments.spec_path``) are relative to
  the folder of the registry file when they lie under it, and absolute otherwise. A project folder
  holding the registry next to its artifacts, data and specs can therefore be copied or moved
  (another disk, another machine) and still finds every stage: :func:`to_stored` writes them,
  :func:`resolve_stored` reads them, and every reader goes through :func:`resolve_stored`.
* **Paths in a spec** (``data.root``, ``data.split_file``, ``artifacts``) are relative to the
  folder of the spec file (:func:`resolve_spec_path`), whatever the current directory is.

Older registries stored absolute folders; migration 3 (``medsae/registry/schema.py``) rewrote
those under the registry's folder as relative ones, and any that remain absolute still resolve.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def registry_folder(registry_path: str | Path) -> Path:
    """The anchor of relative registry paths: the folder of the registry file (links resolved)."""
    return Path(registry_path).resolve().parent


def to_stored(path: str | Path, registry_path: str | Path) -> str:
    """``path`` as the registry stores it: relative (POSIX) under the registry's folder, else absolute."""
    target = Path(path).resolve()
    try:
        return target.relative_to(registry_folder(registry_path)).as_posix()
    except ValueError:
        return str(target)


def resolve_stored(stored: str | Path, registry_path: str | Path | None) -> Path:
    """A path read from the registry as an absolute path (relative ones: next to the registry file).

    Without a registry file (``None``: e.g. an in-memory database) a relative path is taken from
    the current directory.
    """
    path = Path(stored)
    if path.is_absolute():
        return path
    base = registry_folder(registry_path) if registry_path is not None else Path.cwd()
    return base / path


def connection_file(con: Any) -> Path | None:
    """The database file behind a DuckDB connection (absolute), or None for an in-memory one.

    Lets code that holds only a connection resolve registry paths like everyone else.
    """
    row = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    return Path(row[0]) if row and row[0] else None


def resolve_spec_path(value: str, spec_folder: str | Path | None) -> Path:
    """A path written in a spec: ``~`` expanded; relative ones are taken from the spec file's folder.

    ``spec_folder`` is None for a spec that did not come from a file: then the current directory
    is the anchor. The result is absolute either way.
    """
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return path
    return (Path(spec_folder) if spec_folder is not None else Path.cwd()) / path

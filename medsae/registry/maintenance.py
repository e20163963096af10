"""Tidying a registry and its artifacts: remove experiments, collect garbage, tag experiments.

* :func:`plan_removal` / :func:`remove` — ``medsae exp rm``: an experiment's rows go; its stages go
  too unless another experiment still uses them (stages are shared by key). Stage folders stay on
  disk: once no stage row names them they are garbage, which ``medsae gc`` reports and frees.
* :func:`find_garbage` / :func:`delete_garbage` — ``medsae gc``: stage folders whose key no
  registered stage has, ``.tmp``/``.work``/``.old`` leftovers of killed runs, render caches of
  unregistered stages, and LLM cache entries that no ``llm_calls`` row references. Anything whose
  stage lock is held (a run is building it) is left alone, and so is the LLM cache of an artifacts
  folder whose interpret stage is running or whose entries are younger than ``keep_recent_s``
  (``medsae explain run`` writes its ``llm_calls`` rows in batches after the answers are cached).
* :func:`tag` — ``medsae exp tag``: tags and a free-text note per experiment.

gc assumes the artifacts folders it looks at belong to this registry: a folder shared with another
registry would have that registry's stages reported as orphaned.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsae.errors import MedsaeError
from medsae.paths import registry_folder, resolve_spec_path, resolve_stored
from medsae.registry.db import Registry
from medsae.registry.queries import require

#: Stage kinds (folders under an artifacts root), as in medsae.plan.STAGES (kept import-light here).
STAGE_KINDS = ("slices", "embed", "train", "encode", "ground", "evaluate", "summarize", "interpret")
#: How a stage key looks (sha256 hex).
_KEY = re.compile(r"^[0-9a-f]{64}$")
_CACHE_ENTRY = re.compile(r"^([0-9a-f]{64})\.json$")

#: Registry tables holding a stage's rows: table -> columns naming the stage (any match removes a row).
STAGE_TABLES: dict[str, tuple[str, ...]] = {
    "metrics": ("stage_key",),
    "artifacts": ("stage_key",),
    "slices": ("slices_key",),
    "slice_structures": ("slices_key",),
    "ingest_skips": ("slices_key",),
    "latents": ("stage_key", "sae_key"),
    "latent_grounding": ("stage_key", "sae_key"),
    "example_sets": ("stage_key",),
}
#: Tables holding an experiment's own rows.
EXPERIMENT_TABLES = ("experiment_tags", "experiment_notes", "experiment_stages", "experiments")


# -- naming experiments -------------------------------------------------------------------------


def registrations(registry: Registry, name: str) -> list[dict[str, Any]]:
    """Registered experiments called ``name`` (newest first), or ``name@hash-prefix`` for one of them."""
    require(registry)  # no registry file: the one "no registry here yet" message
    rows = registry.query(
        "SELECT experiment_id, name, created_at, spec_path FROM experiments WHERE name = ? ORDER BY created_at DESC",
        [name],
    )
    if not rows and "@" in name:
        base, prefix = name.rsplit("@", 1)
        if re.fullmatch(r"[0-9a-f]{4,64}", prefix):
            rows = registry.query(
                """SELECT experiment_id, name, created_at, spec_path FROM experiments
                   WHERE name = ? AND starts_with(experiment_id, ?) ORDER BY created_at DESC""",
                [base, prefix],
            )
    if not rows:
        raise MedsaeError(f"{registry.path}: no experiment named '{name}' (see `medsae exp list`)")
    return rows


# -- exp rm -------------------------------------------------------------------------------------


@dataclass
class Removal:
    """What removing some experiments does: their rows, the stages only they use, the stages kept."""

    experiments: list[dict[str, Any]]
    removed_stages: list[dict[str, Any]]  # stage_key, kind, folder (absolute or None)
    kept_stages: dict[str, list[str]]  # stage_key -> names of the other experiments using it

    @property
    def experiment_ids(self) -> list[str]:
        return [e["experiment_id"] for e in self.experiments]


def plan_removal(registry: Registry, name: str) -> Removal:
    """Which rows ``medsae exp rm NAME`` would delete (nothing is written)."""
    experiments = registrations(registry, name)
    ids = [e["experiment_id"] for e in experiments]
    rows = registry.query(
        """SELECT es.stage_key, es.kind, s.artifact_dir,
                  list(DISTINCT o.name ORDER BY o.name) FILTER (WHERE o.name IS NOT NULL) AS others
           FROM experiment_stages es
           LEFT JOIN stages s ON s.stage_key = es.stage_key
           LEFT JOIN experiment_stages oes
             ON oes.stage_key = es.stage_key AND NOT list_contains(?, oes.experiment_id)
           LEFT JOIN experiments o ON o.experiment_id = oes.experiment_id
           WHERE list_contains(?, es.experiment_id)
           GROUP BY ALL ORDER BY es.stage_key""",
        [ids, ids],
    )
    removed, kept = [], {}
    for r in rows:
        if r["others"]:
            kept[r["stage_key"]] = list(r["others"])
        else:
            folder = resolve_stored(r["artifact_dir"], registry.path) if r["artifact_dir"] else None
            removed.append({"stage_key": r["stage_key"], "kind": r["kind"], "folder": folder})
    order = {kind: i for i, kind in enumerate(STAGE_KINDS)}
    removed.sort(key=lambda s: (order.get(s["kind"], len(order)), s["stage_key"]))
    return Removal(experiments, removed, kept)


def remove(registry: Registry, removal: Removal) -> None:
    """Delete the rows of :func:`plan_removal`'s answer in one transaction (folders stay for gc)."""
    ids = removal.experiment_ids
    keys = sorted({s["stage_key"] for s in removal.removed_stages})
    with registry.write() as con:
        if keys:
            con.execute(
                """DELETE FROM explanation_scores WHERE explanation_id IN (
                     SELECT explanation_id FROM explanations
                     WHERE list_contains(?, stage_key) OR list_contains(?, sae_key))""",
                [keys, keys],
            )
            con.execute(
                "DELETE FROM explanations WHERE list_contains(?, stage_key) OR list_contains(?, sae_key)",
                [keys, keys],
            )
            for table, columns in STAGE_TABLES.items():
                where = " OR ".join(f"list_contains(?, {c})" for c in columns)
                con.execute(f"DELETE FROM {table} WHERE {where}", [keys] * len(columns))
            con.execute("DELETE FROM stages WHERE list_contains(?, stage_key)", [keys])
        for table in EXPERIMENT_TABLES:
            con.execute(f"DELETE FROM {table} WHERE list_contains(?, experiment_id)", [ids])


# -- gc -----------------------------------------------------------------------------------------


@dataclass
class Garbage:
    """One thing gc would delete."""

    what: str  # 'orphaned stage folder', 'leftover .tmp', ...
    path: Path
    bytes: int
    lock: Path | None = None  # the stage lock to hold while deleting it


@dataclass
class GarbageReport:
    items: list[Garbage] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line each: what was left alone and why
    roots: list[Path] = field(default_factory=list)  # artifacts folders looked at
    caches: list[Path] = field(default_factory=list)  # LLM cache folders looked at

    @property
    def bytes(self) -> int:
        return sum(item.bytes for item in self.items)


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (links are not followed)."""
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


def _lock_held(lock_path: Path) -> bool:
    """Whether another process holds this stage lock now (probing creates no file)."""
    if not lock_path.exists():
        return False
    import filelock

    lock = filelock.FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return True
    lock.release()
    return False


def artifact_roots(registry: Registry, extra: Iterable[str | Path] = ()) -> list[Path]:
    """Artifacts folders of this registry: those holding its stage folders, those its specs name,
    ``<registry folder>/artifacts``, and ``extra``; only existing ones."""
    roots: set[Path] = {Path(p).resolve() for p in extra}
    for r in registry.query("SELECT kind, artifact_dir FROM stages WHERE artifact_dir IS NOT NULL"):
        folder = resolve_stored(r["artifact_dir"], registry.path)
        if folder.parent.name == r["kind"]:
            roots.add(folder.parent.parent.resolve())
    for r in registry.query("SELECT spec_json, spec_path FROM experiments"):
        try:
            written = json.loads(r["spec_json"]).get("artifacts")
        except (TypeError, ValueError):
            continue
        if not written:
            continue
        spec_folder = (
            resolve_stored(r["spec_path"], registry.path).parent if r["spec_path"] else registry_folder(registry.path)
        )
        roots.add(resolve_spec_path(written, spec_folder).resolve())
    roots.add(registry_folder(registry.path) / "artifacts")
    return sorted(p for p in roots if p.is_dir())


def _stage_garbage(root: Path, kind: str, registered: set[str], report: GarbageReport) -> None:
    base = root / kind
    if not base.is_dir():
        return

    def add(what: str, path: Path, key: str) -> None:
        lock = base / ".locks" / f"{key}.lock"
        if _lock_held(lock):
            report.skipped.append(f"{path}: a running medsae process holds its stage lock")
            return
        report.items.append(Garbage(what, path, tree_bytes(path), lock))

    for entry in sorted(base.iterdir()):
        name = entry.name
        if _KEY.match(name) and name not in registered:
            add("orphaned stage folder", entry, name)
        elif name.endswith(".old") and _KEY.match(name[:-4]):
            add("leftover .old", entry, name[:-4])
    for hidden, what in ((".tmp", "leftover .tmp"), (".work", "leftover .work"), (".cache", "orphaned cache")):
        folder = base / hidden
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if hidden == ".cache" and entry.name in registered:
                continue  # the render cache of a registered stage
            add(what, entry, entry.name)


def _cache_garbage(cache: Path, referenced: set[str], keep_recent_s: float, now: float, report: GarbageReport) -> None:
    for folder in sorted(p for p in cache.iterdir() if p.is_dir()):
        for entry in sorted(folder.iterdir()):
            match = _CACHE_ENTRY.match(entry.name)
            temp = entry.name.startswith(".") and entry.name.endswith(".tmp")
            if not (match or temp) or (match and match.group(1) in referenced):
                continue
            try:
                st = entry.lstat()
            except OSError:
                continue
            if now - st.st_mtime < keep_recent_s:
                continue
            what = "stale LLM cache entry" if match else "leftover LLM cache temp file"
            report.items.append(Garbage(what, entry, st.st_size))


def find_garbage(
    registry: Registry,
    extra_roots: Iterable[str | Path] = (),
    llm_caches: Iterable[str | Path] = (),
    keep_recent_s: float = 3600.0,
) -> GarbageReport:
    """Everything gc would delete (nothing is deleted)."""
    import time

    with registry.read():  # no registry: one line, and nothing is garbage without one
        pass
    registered = {r["stage_key"] for r in registry.query("SELECT stage_key FROM stages")}
    report = GarbageReport(roots=artifact_roots(registry, extra_roots))
    for root in report.roots:
        for kind in STAGE_KINDS:
            _stage_garbage(root, kind, registered, report)
    caches = {root / "llm_cache": root for root in report.roots} | {Path(c).resolve(): None for c in llm_caches}
    referenced = {
        r["request_hash"]
        for r in registry.query("SELECT DISTINCT request_hash FROM llm_calls WHERE request_hash IS NOT NULL")
    }
    now = time.time()
    for cache, root in caches.items():
        if not cache.is_dir():
            continue
        locks = root / "interpret" / ".locks" if root is not None else None
        if locks is not None and locks.is_dir() and any(_lock_held(p) for p in locks.glob("*.lock")):
            report.skipped.append(f"{cache}: an interpret stage is running; its answers are not in llm_calls yet")
            continue
        report.caches.append(cache)
        _cache_garbage(cache, referenced, keep_recent_s, now, report)
    return report


def delete_garbage(report: GarbageReport) -> tuple[int, int, list[str]]:
    """Delete the report's items; returns (items deleted, bytes freed, one line per item left)."""
    import filelock

    deleted, freed, problems = 0, 0, []
    for item in report.items:
        lock = filelock.FileLock(str(item.lock)) if item.lock is not None and item.lock.exists() else None
        try:
            if lock is not None:
                lock.acquire(timeout=0)  # a run that started since the scan keeps its folder
        except filelock.Timeout:
            problems.append(f"{item.path}: a medsae process started using it; left alone")
            continue
        try:
            if item.path.is_dir() and not item.path.is_symlink():
                shutil.rmtree(item.path)
            else:
                item.path.unlink()
            deleted += 1
            freed += item.bytes
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"{item.path}: {exc.strerror or exc}")
        finally:
            if lock is not None:
                lock.release()
    for cache in report.caches:  # empty <hash[:2]>/ folders of the LLM cache
        for folder in cache.iterdir():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return deleted, freed, problems


def human_bytes(n: int) -> str:
    """``1234567`` -> ``'1.2 MB'`` (decimal units)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


# -- tags and notes -----------------------------------------------------------------------------


def tag(registry: Registry, experiment_id: str, add: list[str], remove: list[str], note: str | None) -> None:
    """Add and remove tags of one experiment and set (``note``) or clear (``''``) its note."""
    with registry.write() as con:
        for name in add:
            con.execute(
                "INSERT OR IGNORE INTO experiment_tags (experiment_id, tag) VALUES (?, ?)", [experiment_id, name]
            )
        if remove:
            con.execute(
                "DELETE FROM experiment_tags WHERE experiment_id = ? AND list_contains(?, tag)", [experiment_id, remove]
            )
        if note == "":
            con.execute("DELETE FROM experiment_notes WHERE experiment_id = ?", [experiment_id])
        elif note is not None:
            con.execute(
                "INSERT OR REPLACE INTO experiment_notes (experiment_id, note, updated_at) "
                "VALUES (?, ?, current_timestamp)",
                [experiment_id, note],
            )


def labels(registry: Registry, experiment_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """experiment_id -> {'tags': [...], 'note': str | None} (only experiments that have any)."""
    import duckdb

    if not registry.path.exists():
        return {}
    try:
        rows = registry.query(
            """SELECT coalesce(t.experiment_id, n.experiment_id) AS experiment_id, t.tags, n.note
               FROM (SELECT experiment_id, list(tag ORDER BY tag) AS tags FROM experiment_tags GROUP BY 1) t
               FULL JOIN experiment_notes n USING (experiment_id)"""
        )
    except duckdb.CatalogException:  # a registry from before tags (migrated on its next write)
        return {}
    out = {r["experiment_id"]: {"tags": list(r["tags"] or []), "note": r["note"]} for r in rows}
    if experiment_ids is not None:
        out = {k: v for k, v in out.items() if k in set(experiment_ids)}
    return out

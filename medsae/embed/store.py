"""The embedding store: fixed-size ``.npy`` shards, a row -> slice_id index and a manifest.

Layout of an ``embed/<key>/`` folder::

    shard_00000.npy ...   [rows, d] in the spec's dtype; every shard but the last has shard_size rows
    slice_ids.npy         int64 [n]: row -> slice_id, all rows in order
    manifest.json         {n, d, dtype, shard_size, shards: [{file, rows, sha256}], model, pooling,
                           device, images_per_s, ...}

Readers memory-map the shards, so :meth:`EmbeddingStore.load` of a few rows or
:meth:`EmbeddingStore.iter_chunks` over millions never holds more than it returns.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medsae.errors import MedsaeError, MissingInputError

MANIFEST = "manifest.json"
SLICE_IDS = "slice_ids.npy"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npy"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """Write ``path`` so that it either exists complete or not at all (survives SIGKILL)."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_shard(folder: Path, index: int, rows: np.ndarray, dtype: str = "float32") -> dict[str, Any]:
    """Write one shard atomically; returns its manifest entry ``{file, rows, sha256}``."""
    path = Path(folder) / shard_name(index)
    _atomic_save(path, np.ascontiguousarray(rows, dtype=np.dtype(dtype)))
    return {"file": path.name, "rows": int(rows.shape[0]), "sha256": sha256_file(path)}


def write_manifest(
    folder: Path,
    *,
    shards: list[dict[str, Any]],
    slice_ids: np.ndarray,
    d: int,
    dtype: str,
    shard_size: int,
    **meta: Any,
) -> dict[str, Any]:
    """Write ``slice_ids.npy`` and ``manifest.json`` for shards already in ``folder``."""
    folder = Path(folder)
    n = int(sum(s["rows"] for s in shards))
    if n != len(slice_ids):
        raise MedsaeError(f"embed: {n} embedded rows but {len(slice_ids)} slice ids in {folder}")
    _atomic_save(folder / SLICE_IDS, np.asarray(slice_ids, dtype=np.int64))
    manifest = {"n": n, "d": int(d), "dtype": dtype, "shard_size": int(shard_size), "shards": shards, **meta}
    tmp = folder / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)
    return manifest


class EmbeddingStore:
    """Read access to one embed artifact folder."""

    def __init__(self, folder: Path, manifest: dict[str, Any], slice_ids: np.ndarray) -> None:
        self.folder = folder
        self.manifest = manifest
        self.n = int(manifest["n"])
        self.d = int(manifest["d"])
        self.dtype = str(manifest["dtype"])
        self.slice_ids = slice_ids
        self._rows = np.array([s["rows"] for s in manifest["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._rows)])
        self._maps: list[np.ndarray | None] = [None] * len(self._rows)

    def __len__(self) -> int:
        return self.n

    def shard(self, index: int) -> np.ndarray:
        """Memory-mapped shard ``index`` ([rows, d], stored dtype)."""
        cached = self._maps[index]
        if cached is None:
            path = self.folder / self.manifest["shards"][index]["file"]
            if not path.is_file():
                raise MissingInputError(f"embed: shard {path} is missing")
            cached = np.load(path, mmap_mode="r")
            if cached.shape != (self._rows[index], self.d):
                want = (int(self._rows[index]), self.d)
                raise MedsaeError(f"embed: shard {path} has shape {cached.shape}, manifest says {want}")
            self._maps[index] = cached
        return cached

    def load(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 [len(rows), d] (all rows when ``rows`` is None), in the order asked."""
        if rows is None:
            return self._slice(0, self.n)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise MedsaeError(f"embed: row index out of range 0..{self.n - 1} in {self.folder}")
        out = np.empty((rows.size, self.d), dtype=np.float32)
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        order = np.argsort(shard_of, kind="stable")
        bounds = np.searchsorted(shard_of[order], np.arange(len(self._rows) + 1))
        for s in range(len(self._rows)):
            pick = order[bounds[s] : bounds[s + 1]]
            if pick.size:
                local = rows[pick] - self._starts[s]
                # fancy indexing on a memmap reads only the rows asked (sorted for sequential access)
                sort = np.argsort(local, kind="stable")
                out[pick[sort]] = self.shard(s)[local[sort]]
        return out

    def _slice(self, start: int, stop: int) -> np.ndarray:
        """Contiguous rows [start, stop) as float32."""
        out = np.empty((max(stop - start, 0), self.d), dtype=np.float32)
        first = int(np.searchsorted(self._starts, start, side="right") - 1)
        pos = start
        for s in range(max(first, 0), len(self._rows)):
            if pos >= stop:
                break
            lo, hi = pos - self._starts[s], min(stop, self._starts[s + 1]) - self._starts[s]
            out[pos - start : pos - start + hi - lo] = self.shard(s)[lo:hi]
            pos += hi - lo
        return out

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, float32 [<=chunk_rows, d])`` over all rows in order."""
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        for start in range(0, self.n, chunk_rows):
            yield start, self._slice(start, min(start + chunk_rows, self.n))

    def verify(self) -> None:
        """Recompute every shard's sha256 against the manifest (raises on the first mismatch)."""
        for entry in self.manifest["shards"]:
            path = self.folder / entry["file"]
            if sha256_file(path) != entry["sha256"]:
                raise MedsaeError(f"embed: shard {path} does not match its sha256 in {self.folder / MANIFEST}")


def open_embeddings(embed_dir: str | Path) -> EmbeddingStore:
    """Open a completed embed artifact folder."""
    folder = Path(embed_dir)
    path = folder / MANIFEST
    if not path.is_file():
        raise MissingInputError(f"embed: no {MANIFEST} in {folder} (not a completed embed artifact)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MedsaeError(f"embed: {path} is not valid JSON ({err})") from None
    ids_path = folder / SLICE_IDS
    if not ids_path.is_file():
        raise MissingInputError(f"embed: {ids_path} is missing")
    slice_ids = np.load(ids_path).astype(np.int64, copy=False)
    if len(slice_ids) != int(manifest["n"]):
        raise MedsaeError(f"embed: {ids_path} has {len(slice_ids)} ids, manifest says n={manifest['n']}")
    return EmbeddingStore(folder, manifest, slice_ids)

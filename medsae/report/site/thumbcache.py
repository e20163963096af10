"""Slice thumbnails of the explorer, from the thumbnail cache of :mod:`medsae.data.render`.

There is one thumbnail cache: :func:`medsae.data.render.thumbnail` (the one-file report, the LLM
explainer's and the study's vision prompts) and the explorer read and write the same files,
``<artifacts>/slices/.cache/<slices key>/thumbs/<size>/<slice id>.png``, with the same bytes
(:func:`medsae.data.render.encode_png`: they key the LLM cache, so the encoding is render's). The
cache sits outside the artifact itself, so ``medsae gc`` deletes it together with the slices stage
it belongs to (an "orphaned cache"), and leaves it alone while that stage is registered.

* Missing slices are rendered one scan at a time (each volume is read once) in a pool of worker
  processes sized by :func:`medsae.threads.worker_count`; each PNG is written to a uniquely named
  temporary file and moved into place with ``os.replace`` (:func:`medsae.data.render.write_atomic`),
  so two builds filling the same cache at once each see whole files only (the last writer wins,
  with the same bytes).
* A cache file is used only if it is a whole PNG (:func:`png_is_whole`: signature, every chunk's
  CRC, ``IEND`` last); a truncated or corrupt file is rendered again.
* :attr:`ThumbCache.stats` counts what one build did (rendered, reused, rejected, failed).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsae.data.render import (
    THUMBS_FOLDER,
    _mp_context,
    _scan_groups,
    encode_png,
    png_is_whole,
    render_index,
    render_scan_images,
    thumbnail_folder,
    write_atomic,
)

#: Cache folder of a slices stage (under ``<artifacts>/slices/.cache/<key>/``): render's thumbnail cache.
CACHE_FOLDER = THUMBS_FOLDER
#: Slices rendered per task of the worker pool (a few scans' worth: amortises process hand-offs).
BATCH = 256


def cache_folder(slices_dir: str | Path, size: int) -> Path:
    """The cache folder of a slices artifact's thumbnails at ``size`` px (:func:`medsae.data.render.thumbnail`'s)."""
    return thumbnail_folder(slices_dir, size)


def _render_batch(args: tuple[str, str, int, list[int]]) -> tuple[int, list[tuple[int, str]]]:
    """Render ``ids`` (sorted) of a slices artifact into ``folder``; returns (written, [(slice_id, why)])."""
    slices_dir, folder, size, ids = args
    index = render_index(slices_dir)
    written, failed = 0, []
    for run in _scan_groups(index, np.asarray(ids, dtype=np.int64)):  # each volume read once
        try:
            images = render_scan_images(index, int(index.scan_of_slice[run[0]]), run, size)
            for sid, image in zip(run.tolist(), images, strict=True):
                write_atomic(Path(folder) / f"{sid}.png", encode_png(image))
                written += 1
        except Exception as exc:  # a bad volume must not sink the others; the page says why
            why = f"{type(exc).__name__}: {exc}"
            failed += [(sid, why) for sid in run.tolist() if not (Path(folder) / f"{sid}.png").is_file()]
    return written, failed


@dataclass
class CacheStats:
    """What one use of the cache did."""

    reused: int = 0  # whole PNGs found in the cache
    rendered: int = 0  # PNGs rendered and written by this build
    rejected: int = 0  # cache files that were not whole PNGs (rendered again)
    failed: dict[int, str] = field(default_factory=dict)  # slice_id -> why it could not be rendered


class ThumbCache:
    """Thumbnails of one slices artifact at one size, in ``folder`` (default: :func:`cache_folder`)."""

    def __init__(self, slices_dir: str | Path, size: int, folder: str | Path | None = None) -> None:
        self.slices_dir = Path(slices_dir).resolve()
        self.size = int(size)
        self.folder = Path(folder) if folder is not None else cache_folder(self.slices_dir, self.size)
        self.stats = CacheStats()

    def path(self, slice_id: int) -> Path:
        return self.folder / f"{int(slice_id)}.png"

    def read(self, slice_id: int) -> bytes | None:
        """The cached PNG of a slice when the file is a whole PNG, else None."""
        try:
            data = self.path(slice_id).read_bytes()
        except OSError:
            return None
        if png_is_whole(data):
            return data
        self.stats.rejected += 1
        return None

    def render(self, ids: Iterable[int], workers: int | None = None) -> None:
        """Render ``ids`` into the cache (one process per worker; in this process when one suffices).

        Creates the folder; raises ``OSError`` when it cannot be written.
        """
        from medsae.progress import task
        from medsae.threads import thread_count, worker_count

        count = len(render_index(self.slices_dir).axis)
        todo = []
        for sid in sorted({int(s) for s in ids}):
            if 0 <= sid < count:
                todo.append(sid)
            else:
                self.stats.failed[sid] = f"slice_id out of range (the slices artifact has {count} slices)"
        if not todo:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable", str(self.folder))
        batches = [todo[i : i + BATCH] for i in range(0, len(todo), BATCH)]
        jobs = [(str(self.slices_dir), str(self.folder), self.size, b) for b in batches]
        n = min(worker_count(workers or thread_count()), len(jobs))
        if n <= 1:
            with task("thumbnails", total=len(todo), unit="slices") as advance:
                for job in jobs:
                    self._count(*_render_batch(job))
                    advance(len(job[3]))
            return
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # the workers start (fork) before the progress display's thread does
        with ProcessPoolExecutor(max_workers=n, mp_context=_mp_context()) as pool:
            futures = {pool.submit(_render_batch, job): len(job[3]) for job in jobs}
            with task("thumbnails", total=len(todo), unit="slices") as advance:
                for future in as_completed(futures):
                    self._count(*future.result())
                    advance(futures[future])

    def _count(self, written: int, failed: list[tuple[int, str]]) -> None:
        self.stats.rendered += written
        self.stats.failed.update(failed)

"""Slice thumbnails of the explorer, rendered once into a cache that outlives builds.

A thumbnail is a function of the slices artifact (its stage key), the slice id, the pixel size and
this module's :data:`RENDERER_VERSION`, so the cache file is named by exactly those:
``<artifacts>/slices/.cache/<slices key>/site-thumbs/v<version>-<size>px/<slice id>.png``. It sits
beside the render caches of :mod:`medsae.data.render` (outside the artifact itself), so ``medsae gc``
deletes it together with the slices stage it belongs to (an "orphaned cache"), and leaves it alone
while that stage is registered. (gc cannot tell an outdated ``v<version>`` folder of a registered
stage from a current one without importing this module, which the registry layer must not; after a
version bump, ``rm -r <artifacts>/slices/.cache/*/site-thumbs/v<old>-*`` frees the old pictures.)

* Missing slices are rendered one scan at a time (each volume is read once) in a pool of worker
  processes sized by :func:`medsae.threads.worker_count`; each PNG is written to a temporary file
  and moved into place with ``os.replace``, so two builds filling the same cache at once each see
  whole files only (the last writer wins, with the same bytes).
* A cache file is used only if it is a whole PNG (signature, every chunk's CRC, ``IEND`` last); a
  truncated or corrupt file is rendered again.
* :attr:`ThumbCache.stats` counts what one build did (rendered, reused, rejected, failed).
"""

from __future__ import annotations

import os
import secrets
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: Bump when the pixels or the PNG encoding of a thumbnail change: older cache entries are then ignored.
RENDERER_VERSION = 1
#: Cache folder of a slices stage (under ``<artifacts>/slices/.cache/<key>/``).
CACHE_FOLDER = "site-thumbs"
#: Slices rendered per task of the worker pool (a few scans' worth: amortises process hand-offs).
BATCH = 256
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_is_whole(data: bytes) -> bool:
    """Whether ``data`` is a complete PNG: the signature, chunks whose CRCs match, and ``IEND`` at the end."""
    if not data.startswith(_PNG_SIGNATURE):
        return False
    view = memoryview(data)
    pos, end = len(_PNG_SIGNATURE), len(data)
    while pos + 12 <= end:
        length = int.from_bytes(view[pos : pos + 4], "big")
        stop = pos + 12 + length
        if stop > end:
            return False
        if zlib.crc32(view[pos + 4 : stop - 4]) != int.from_bytes(view[stop - 4 : stop], "big"):
            return False
        if view[pos + 4 : pos + 8] == b"IEND":
            return stop == end
        pos = stop
    return False


def cache_folder(slices_dir: str | Path, size: int) -> Path:
    """The default cache folder of a slices artifact's thumbnails at ``size`` px."""
    base = Path(slices_dir).resolve()
    return base.parent / ".cache" / base.name / CACHE_FOLDER / f"v{RENDERER_VERSION}-{int(size)}px"


def encode_png(image) -> bytes:
    """PNG bytes of a uint8 image (what the cache stores; part of :data:`RENDERER_VERSION`)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    # zlib level 3: a 128 px slice encodes in about half the time of the default level 6, 9 % larger
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _render_batch(args: tuple[str, str, int, list[int]]) -> tuple[int, list[tuple[int, str]]]:
    """Render ``ids`` (sorted) of a slices artifact into ``folder``; returns (written, [(slice_id, why)])."""
    import numpy as np

    from medsae.data.render import _scan_groups, render_index, render_scan_images

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
        from medsae.data.render import _mp_context, render_index
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

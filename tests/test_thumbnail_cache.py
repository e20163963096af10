"""One thumbnail cache: render.thumbnail (report, LLM vision prompts) and the explorer share its files.

The bytes ``thumbnail`` returns go into LLM requests whose content hashes key the LLM cache, so they
are pinned to an independent PIL encoding of ``render_slice``; the explorer's batch renderer must
write exactly those bytes into the same files, and a damaged cache file must be rendered again.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

import medsae.data.render as render
from medsae.data.build import run_ingest
from medsae.data.phantom import write_phantom
from medsae.data.render import png_is_whole, render_slice, thumbnail, thumbnail_path
from medsae.report.site.thumbcache import ThumbCache, cache_folder

SIZE = 48


@pytest.fixture(scope="module")
def slices_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("thumbs")
    dataset = write_phantom(base / "ts", subjects=4, seed=3, shape=(24, 24, 28))
    run_ingest(dataset, {"root": str(dataset), "size": 32, "workers": 1}, base / "out", base / "work")
    return base / "out"


@pytest.fixture
def fresh(slices_dir):
    """The slices artifact with an empty thumbnail cache at SIZE."""
    folder = cache_folder(slices_dir, SIZE)
    if folder.is_dir():
        for p in folder.iterdir():
            p.unlink()
    return slices_dir


def pil_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def some_ids(slices_dir) -> list[int]:
    n = len(render.render_index(slices_dir).axis)
    return sorted({0, 1, n // 3, n // 2, n // 2 + 1, n - 1})


def forbid_rendering(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("rendered although the cache holds the thumbnail")

    monkeypatch.setattr(render, "render_slice", refuse)
    monkeypatch.setattr(render, "render_scan_images", refuse)
    monkeypatch.setattr("medsae.report.site.thumbcache.render_scan_images", refuse)


def test_thumbnail_bytes_are_pils_png_of_render_slice(fresh):
    """The LLM-facing bytes: PIL's PNG (optimize=False, default compression) of render_slice, cached as is."""
    for sid in some_ids(fresh):
        png = thumbnail(fresh, sid, SIZE)
        assert png == pil_png(render_slice(fresh, sid, size=SIZE))
        assert thumbnail_path(fresh, sid, SIZE).read_bytes() == png
        assert png_is_whole(png)


def test_explorer_cache_and_thumbnail_share_one_file(fresh, monkeypatch):
    ids = some_ids(fresh)
    assert cache_folder(fresh, SIZE) == thumbnail_path(fresh, ids[0], SIZE).parent
    cache = ThumbCache(fresh, SIZE)
    cache.render(ids, workers=2)
    assert cache.stats.rendered == len(ids) and not cache.stats.failed
    batch = {sid: cache.read(sid) for sid in ids}
    assert all(batch.values())
    assert {p.name for p in cache.folder.iterdir()} == {f"{s}.png" for s in ids}  # no temp files left
    for sid in ids:  # the batch renderer writes exactly thumbnail()'s bytes
        assert batch[sid] == pil_png(render_slice(fresh, sid, size=SIZE))

    with monkeypatch.context() as m:  # thumbnail() reads the explorer's files without rendering
        forbid_rendering(m)
        assert {sid: thumbnail(fresh, sid, SIZE) for sid in ids} == batch

    for sid in ids:  # and the explorer reads thumbnail()'s files without rendering
        thumbnail_path(fresh, sid, SIZE).unlink()
        thumbnail(fresh, sid, SIZE)
    with monkeypatch.context() as m:
        forbid_rendering(m)
        again = ThumbCache(fresh, SIZE)
        assert {sid: again.read(sid) for sid in ids} == batch
        assert again.stats.rejected == 0


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty"])
def test_damaged_cache_file_is_rendered_again(fresh, damage):
    sid = some_ids(fresh)[2]
    whole = thumbnail(fresh, sid, SIZE)
    path = thumbnail_path(fresh, sid, SIZE)
    if damage == "truncated":
        bad = whole[: len(whole) // 2]
    elif damage == "flipped":
        data = bytearray(whole)
        data[len(data) // 2] ^= 0xFF
        bad = bytes(data)
    else:
        bad = b""
    path.write_bytes(bad)
    assert not png_is_whole(bad)
    assert thumbnail(fresh, sid, SIZE) == whole
    assert path.read_bytes() == whole  # the cache file is replaced by a whole one
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def test_unwritable_cache_still_renders(fresh, monkeypatch):
    def refuse(path, data):
        raise PermissionError(13, "read-only", str(path))

    monkeypatch.setattr(render, "write_atomic", refuse)
    sid = some_ids(fresh)[1]
    assert thumbnail(fresh, sid, SIZE) == pil_png(render_slice(fresh, sid, size=SIZE))
    assert not thumbnail_path(fresh, sid, SIZE).exists()


def test_write_atomic_leaves_no_temp_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.png"

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        render.write_atomic(target, b"data")
    assert list(tmp_path.iterdir()) == []

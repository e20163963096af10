"""The explorer's thumbnail cache: rendered once, reused by every later build, safe under concurrency.

The registry is test_report_html's (its slices artifact is the real slices stage on a tiny phantom).
What a build needs is recomputed here from the registry's explain sets; whether a cache file was
rendered again is read from the file system (inode and modification time: ``os.replace`` of a fresh
render gives a new inode), not from the code's own counters; pixels are compared with
``render_slice``, PNGs decoded with PIL.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image
from test_report_html import fabricate  # a sibling test module

from medsae.data.render import render_slice
from medsae.registry.maintenance import GarbageReport, delete_garbage, find_garbage
from medsae.report.site.build import _thumbnails, build_site
from medsae.report.site.images import ImageStore
from medsae.report.site.thumbcache import CACHE_FOLDER, cache_folder, png_is_whole

EXP = "demo@k=8"
PER_GROUP = 3  # slices per example group on a page: fewer than the 8 top examples of each explain set
SIZE = 128


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("scale")
    fab = fabricate(root / "fab")
    slices_dir = root / "fab" / "artifacts" / "slices" / fab["keys"]["slices"]
    return fab | {"slices_dir": slices_dir, "cache": cache_folder(slices_dir, SIZE)}


@pytest.fixture
def fab(fabricated) -> dict:
    """The module's registry with an empty thumbnail cache."""
    shutil.rmtree(fabricated["cache"], ignore_errors=True)
    return fabricated


def needed_slices(fab: dict, per_group: int) -> set[int]:
    """Slices the pages show: the ``per_group`` strongest top examples and non-firing contrasts of each set."""
    with duckdb.connect(str(fab["registry"].path), read_only=True) as con:
        rows = con.execute(
            "SELECT slice_ids, activations, roles FROM example_sets WHERE stage_key = ? AND purpose = 'explain'",
            [fab["keys"]["summarize"]],
        ).fetchall()
    needed: set[int] = set()
    for ids, acts, roles in rows:
        for firing in (True, False):
            group = [(a, s) for s, a, r in zip(ids, acts, roles, strict=True) if (r == "top" and a > 0) == firing]
            needed |= {s for _, s in sorted(group, key=lambda t: -t[0])[:per_group]}
    return needed


def cache_state(folder: Path) -> dict[str, tuple[int, int]]:
    """file name -> (inode, mtime in ns) of every file in the cache folder."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def page_thumbnails(site: Path) -> dict[int, Path]:
    """slice_id -> thumbnail file, read from the latent pages' <img alt="slice N" src=...>."""
    shown = {}
    for page in (site / "latents").glob("*.html"):
        for src, sid in re.findall(r'<img src="\.\./(thumbs/[0-9a-f]{64}\.png)" alt="slice (\d+)"', page.read_text()):
            shown[int(sid)] = site / src
    return shown


def assert_real_render(path: Path, fab: dict, sid: int) -> None:
    image = np.asarray(Image.open(io.BytesIO(path.read_bytes())))
    assert image.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(image, render_slice(fab["slices_dir"], sid, size=SIZE))


def test_cache_is_filled_once_and_reused(fab, tmp_path):
    needed = needed_slices(fab, PER_GROUP)
    assert 0 < len(needed) < len({s for r in fab["sets"].values() for s in r["slice_ids"]})  # the bound bites
    build_site(fab["registry"], EXP, tmp_path / "site", n_slices=PER_GROUP)
    cache = fab["cache"]
    assert cache.parent.name == CACHE_FOLDER and cache.parents[2] == fab["slices_dir"].parent / ".cache"
    assert {p.name for p in cache.iterdir()} == {f"{s}.png" for s in needed}  # no temp files left behind
    shown = page_thumbnails(tmp_path / "site")
    assert set(shown) == needed
    for sid, path in shown.items():
        assert os.path.samefile(path, cache / f"{sid}.png")  # hard-linked, not a second copy
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem
    for sid in sorted(needed)[:5]:
        assert_real_render(cache / f"{sid}.png", fab, sid)

    before = cache_state(cache)
    build_site(fab["registry"], EXP, tmp_path / "site", n_slices=PER_GROUP)  # rebuild the same site
    assert cache_state(cache) == before  # nothing rendered again, nothing added
    again = page_thumbnails(tmp_path / "site")
    assert set(again) == needed
    assert all(os.path.samefile(path, cache / f"{sid}.png") for sid, path in again.items())


def _thumbnails_at_barrier(slices_dir: str, ids: list[int], out: str, barrier, answers) -> None:
    barrier.wait(60)
    paths, note = _thumbnails(slices_dir, ids, SIZE, ImageStore(Path(out)))
    answers.put((out, paths, note))


def test_concurrent_builds_share_the_cache(fab, tmp_path):
    """Two builds fill the same empty cache at once (every slice of the artifact: about a second of rendering)."""
    ids = list(range(len(fab["slices"])))
    ctx = mp.get_context("fork")
    barrier, answers = ctx.Barrier(2), ctx.Queue()
    outs = [str(tmp_path / name) for name in ("a", "b")]
    builds = [
        ctx.Process(target=_thumbnails_at_barrier, args=(str(fab["slices_dir"]), ids, out, barrier, answers))
        for out in outs
    ]
    for p in builds:
        p.start()
    results = {}
    for _ in builds:
        out, paths, note = answers.get(timeout=240)
        results[out] = (paths, note)
    for p in builds:
        p.join(60)
    assert [p.exitcode for p in builds] == [0, 0]
    (a, note_a), (b, note_b) = results[outs[0]], results[outs[1]]
    assert note_a is None and note_b is None and set(a) == set(ids) and a == b
    thumbs = [{p.name: p.read_bytes() for p in (Path(out) / "thumbs").iterdir()} for out in outs]
    assert thumbs[0] == thumbs[1]  # the same files, byte for byte
    assert {p.name for p in fab["cache"].iterdir()} == {f"{s}.png" for s in ids}  # whole files only, no temp files
    assert all(png_is_whole(p.read_bytes()) for p in fab["cache"].iterdir())
    for sid in ids[:: len(ids) // 4]:
        assert_real_render(Path(outs[1]) / b[sid], fab, sid)


def test_corrupt_or_missing_cache_files_are_rendered_again(fab, tmp_path):
    ids = sorted(needed_slices(fab, PER_GROUP))[:12]
    slices_dir = str(fab["slices_dir"])
    first, note = _thumbnails(slices_dir, ids, SIZE, ImageStore(tmp_path / "one"))
    assert note is None and set(first) == set(ids)
    cache = fab["cache"]
    truncated, flipped, removed = ids[:3]
    whole = (cache / f"{truncated}.png").read_bytes()
    (cache / f"{truncated}.png").unlink()  # a fresh inode: the first site keeps its link to the good bytes
    (cache / f"{truncated}.png").write_bytes(whole[: len(whole) // 2])
    data = bytearray((cache / f"{flipped}.png").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (cache / f"{flipped}.png").unlink()
    (cache / f"{flipped}.png").write_bytes(bytes(data))
    (cache / f"{removed}.png").unlink()
    assert not png_is_whole(whole[: len(whole) // 2]) and not png_is_whole(bytes(data)) and png_is_whole(whole)
    before = cache_state(cache)

    second, note = _thumbnails(slices_dir, ids, SIZE, ImageStore(tmp_path / "two"))
    assert note is None and second == first  # the same content-addressed names
    after = cache_state(cache)
    damaged = {f"{s}.png" for s in (truncated, flipped, removed)}
    assert set(after) == set(before) | damaged
    assert {n for n in after if after[n] != before.get(n)} == damaged  # only those were rendered again
    for sid in ids:
        path = tmp_path / "two" / second[sid]
        assert os.path.samefile(path, cache / f"{sid}.png")
        assert_real_render(path, fab, sid)


def test_gc_frees_the_cache_of_an_unregistered_slices_stage(fab, tmp_path):
    ids = sorted(needed_slices(fab, PER_GROUP))[:5]
    _thumbnails(str(fab["slices_dir"]), ids, SIZE, ImageStore(tmp_path / "kept"))
    # a copy of the slices artifact under a key no stage row has (as after `medsae exp rm` of its experiments)
    gone = fab["slices_dir"].parent / ("f" * 64)
    shutil.copytree(fab["slices_dir"], gone)
    paths, note = _thumbnails(str(gone), ids, SIZE, ImageStore(tmp_path / "site"))
    assert note is None and len(paths) == len(ids)
    gone_cache = gone.parent / ".cache" / gone.name
    assert cache_folder(gone, SIZE).is_relative_to(gone_cache)
    items = {i.path: i for i in find_garbage(fab["registry"]).items}
    assert items[gone_cache].what == "orphaned cache"
    assert items[gone_cache].bytes == sum(p.stat().st_size for p in gone_cache.rglob("*") if p.is_file())
    assert not [p for p in items if fab["cache"].is_relative_to(p)]  # the registered stage's cache stays
    delete_garbage(GarbageReport(items=[items[gone_cache], items[gone]]))
    assert not gone_cache.exists() and fab["cache"].is_dir()
    kept = [tmp_path / "site" / p for p in paths.values()]  # a built site keeps its (hard-linked) thumbnails
    assert all(png_is_whole(p.read_bytes()) for p in kept)

"""The embed stage: shards equal per-slice embeddings, workers change nothing, SIGKILL resumes
byte-identically.

A small stand-in renderer (scans stored as uint8 .npy stacks, one file read per scan) takes the
place of the data package's ``iter_scan_images``; it has the same signature and yields one scan at
a time, like the real one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medsae.embed.backbones import load_backbone
from medsae.embed.config import EmbedSpec
from medsae.embed.stage import embed_stage, render_rows, work_items
from medsae.embed.store import open_embeddings
from medsae.errors import MedsaeError
from medsae.stage import StageContext

TINY = {
    "source": "timm",
    "model": "vit_small_patch16_dinov3",
    "pretrained": False,
    "model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32},
    "input_size": 32,
    "pooling": "cls+mean",
    "device": "cpu",
}


# --------------------------------------------------------------------------------------------
# the stand-in data: scans as .npy stacks + an index, rendered one scan (one file read) at a time


def make_standin(folder: Path, sizes=(7, 9, 7), size: int = 40, seed: int = 0) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for s, n in enumerate(sizes):
        yy, xx = np.mgrid[:size, :size]
        base = (127 + 100 * np.sin(xx / (3 + s) + yy / 5)).astype(np.float32)
        vol = np.clip(base[None] + rng.normal(0, 30, (n, size, size)), 0, 255).astype(np.uint8)
        np.save(folder / f"scan_{s}.npy", vol)
        rows += [(len(rows) + k, "ct" if s % 2 == 0 else "mri", f"s{s:04d}", s, k) for k in range(n)]
    table = pd.DataFrame(rows, columns=["slice_id", "modality", "image_id", "scan", "idx"])
    table.to_csv(folder / "standin.csv", index=False)
    return table


def standin_render(slices_dir: Path, slice_ids=None):
    """Same contract as medsae.data.render.iter_scan_images: (ids, uint8 [n, H, W]) per scan."""
    table = pd.read_csv(Path(slices_dir) / "standin.csv").set_index("slice_id")
    ids = table.index.to_numpy() if slice_ids is None else np.asarray(slice_ids)
    sub = table.loc[ids]
    for scan in pd.unique(sub["scan"]):
        delay = float(os.environ.get("STANDIN_DELAY", "0"))
        if delay:
            time.sleep(delay)
        part = sub[sub["scan"] == scan]
        vol = np.load(Path(slices_dir) / f"scan_{scan}.npy")
        yield part.index.to_numpy(), vol[part["idx"].to_numpy()]


def make_ctx(root: Path, out: Path, work: Path, **params) -> StageContext:
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(
        kind="embed",
        key="test",
        spec=EmbedSpec(**{**TINY, **params}),
        out_dir=out,
        work_dir=work,
        inputs={"slices": root},
        input_keys={"slices": "s"},
        seed=0,
        quiet=True,
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------


def test_work_items_split_at_scans_and_shards():
    scans = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    assert work_items(scans, 4) == [(0, 3), (3, 4), (4, 5), (5, 8), (8, 10)]


def test_render_rows_reorders_and_checks():
    def shuffled(_, ids):
        yield ids[::-1], np.stack([np.full((2, 2), i, np.uint8) for i in ids[::-1]])

    out = render_rows(shuffled, Path("."), np.array([3, 5, 9]))
    assert out[:, 0, 0].tolist() == [3, 5, 9]
    with pytest.raises(MedsaeError, match="every requested slice"):
        render_rows(lambda _, ids: iter([(ids[:1], np.zeros((1, 2, 2), np.uint8))]), Path("."), np.array([1, 2]))


def test_stage_shards_equal_each_slice_embedded_alone(tmp_path):
    table = make_standin(tmp_path / "slices")
    ctx = make_ctx(tmp_path / "slices", tmp_path / "out", tmp_path / "work", shard_size=8, batch_size=3)
    result = embed_stage(ctx, table, standin_render)

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "shard_00000.npy",
        "shard_00001.npy",
        "shard_00002.npy",
        "slice_ids.npy",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n"] == 23 and manifest["d"] == 64 and manifest["dtype"] == "float32"
    assert [s["rows"] for s in manifest["shards"]] == [8, 8, 7]
    assert all(s["sha256"] == _sha(out / s["file"]) for s in manifest["shards"])
    assert manifest["device"] == "cpu" and manifest["images_per_s"] > 0 and manifest["pooling"] == "cls+mean"
    np.testing.assert_array_equal(np.load(out / "slice_ids.npy"), np.arange(23))

    backbone = load_backbone(EmbedSpec(**TINY))  # same seed, same weights; one slice at a time
    vols = {s: np.load(tmp_path / "slices" / f"scan_{s}.npy") for s in range(3)}
    alone = np.concatenate([backbone.embed(vols[r.scan][r.idx][None]).numpy() for r in table.itertuples()])
    np.testing.assert_allclose(open_embeddings(out).load(), alone, rtol=1e-5, atol=1e-5)

    metrics = {m.name: m for m in result.metrics}
    assert metrics["images_per_s"].value > 0 and metrics["images_per_s"].extra["device"] == "cpu"
    assert metrics["embedding_dim"].value == 64
    assert result.device == "cpu" and result.summary["n"] == 23 and result.summary["resumed_shards"] == 0


def test_workers_leave_bytes_unchanged_and_batch_size_leaves_values(tmp_path):
    table = make_standin(tmp_path / "slices", sizes=(5, 6, 4))
    runs = {}
    for name, extra in {"w0": {"num_workers": 0}, "w2": {"num_workers": 2}, "b7": {"batch_size": 7}}.items():
        ctx = make_ctx(
            tmp_path / "slices",
            tmp_path / name,
            tmp_path / f"work_{name}",
            shard_size=6,
            **{"batch_size": 4, **extra},
        )
        embed_stage(ctx, table, standin_render)
        runs[name] = tmp_path / name
    for shard in ("shard_00000.npy", "shard_00001.npy", "shard_00002.npy"):
        assert _sha(runs["w0"] / shard) == _sha(runs["w2"] / shard)
    np.testing.assert_allclose(
        open_embeddings(runs["b7"]).load(), open_embeddings(runs["w0"]).load(), rtol=1e-5, atol=1e-5
    )


def test_float16_shards(tmp_path):
    table = make_standin(tmp_path / "slices", sizes=(3, 2))
    ctx = make_ctx(tmp_path / "slices", tmp_path / "out", tmp_path / "work", dtype="float16", shard_size=4)
    embed_stage(ctx, table, standin_render)
    assert np.load(tmp_path / "out" / "shard_00000.npy").dtype == np.float16
    ref_ctx = make_ctx(tmp_path / "slices", tmp_path / "ref", tmp_path / "work32", shard_size=4)
    embed_stage(ref_ctx, table, standin_render)
    ref = open_embeddings(tmp_path / "ref").load()
    np.testing.assert_allclose(open_embeddings(tmp_path / "out").load(), ref, rtol=2e-3, atol=2e-3)


_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from pathlib import Path
from test_embed_stage import make_ctx, standin_render
import pandas as pd
from medsae.embed.stage import embed_stage
root, out, work = map(Path, sys.argv[1:4])
table = pd.read_csv(root / "standin.csv")
result = embed_stage(make_ctx(root, out, work, shard_size=4, batch_size=3), table, standin_render)
print(json.dumps(result.summary))
"""


def test_sigkill_mid_run_resumes_at_the_next_shard_byte_identically(tmp_path):
    root = tmp_path / "slices"
    make_standin(root, sizes=(6, 5, 7, 6))  # 24 rows -> 6 shards of 4
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, MEDSAE_QUIET="1")

    def start(name, delay="0"):
        return subprocess.Popen(
            [sys.executable, str(script), str(root), str(tmp_path / name), str(tmp_path / f"work_{name}")],
            env={**env, "STANDIN_DELAY": delay},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    reference = start("reference")
    killed = start("killed", delay="0.5")
    record = tmp_path / "work_killed" / "shards.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if record.is_file() and len(record.read_text().splitlines()) >= 2:
                break
            assert killed.poll() is None, "the run ended before it could be killed: " + killed.stderr.read()
            time.sleep(0.02)
        else:
            pytest.fail("no shard was recorded in time")
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    finally:
        if killed.poll() is None:
            killed.kill()
    n_before = len(record.read_text().splitlines())
    assert 2 <= n_before < 6 and not (tmp_path / "killed" / "manifest.json").exists()

    resumed = start("killed")  # same work dir: picks up at the next shard
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["resumed_shards"] == n_before and summary["shards"] == 6
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err

    ref_manifest = json.loads((tmp_path / "reference" / "manifest.json").read_text())
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert manifest["shards"] == ref_manifest["shards"]  # names, rows and sha256 of every shard
    for shard in ref_manifest["shards"]:
        assert (tmp_path / "killed" / shard["file"]).read_bytes() == (
            tmp_path / "reference" / shard["file"]
        ).read_bytes()


def test_run_embed_on_a_phantom_embeds_what_render_slice_shows(tmp_path):
    """The real chain: phantom NIfTI volumes -> slices stage -> run_embed (real iter_scan_images)."""
    from medsae.data.config import DataSpec
    from medsae.data.render import render_slice
    from medsae.data.stage import run_slices
    from medsae.embed.stage import run_embed

    data = DataSpec(root=str(tmp_path / "phantom"), phantom={"subjects": 2, "seed": 1, "shape": (24, 24, 28)}, size=32)
    slices_dir = tmp_path / "slices"
    slices_dir.mkdir()
    run_slices(
        StageContext(
            kind="slices",
            key="s",
            spec=data,
            out_dir=slices_dir,
            work_dir=tmp_path / "slices.work",
            inputs={},
            input_keys={},
            seed=0,
            quiet=True,
        )
    )
    result = run_embed(make_ctx(slices_dir, tmp_path / "out", tmp_path / "work", shard_size=32, batch_size=16))
    store = open_embeddings(tmp_path / "out")
    assert store.n == result.summary["n"] > 40 and store.d == 64
    backbone = load_backbone(EmbedSpec(**TINY))
    rows = np.random.default_rng(0).choice(store.n, 6, replace=False)
    alone = np.concatenate(
        [backbone.embed(render_slice(slices_dir, int(store.slice_ids[r]))[None]).numpy() for r in rows]
    )
    np.testing.assert_allclose(store.load(rows), alone, rtol=1e-5, atol=1e-5)

"""Resuming the embed stage when the recorded shards are not a contiguous run from shard 0.

The Ray executor (:mod:`medsae.executor.ray`) embeds each shard in a task of its own and the driver
records them (:func:`medsae.embed.stage.adopt_shards`) in the order the tasks finish; a driver killed
after shards 2 and 1 are recorded, but not 0, must resume with only the shards it lacks, and the
final artifacts must be an uninterrupted run's, byte for byte.

The slices artifact is the stand-in of ``test_embed_stage`` (scans as .npy stacks): ``load_slices``
and ``iter_scan_images`` are replaced by its reader and renderer where the stage module uses them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_embed_stage import TINY, make_ctx, make_standin, standin_render  # sibling test module

from medsae.embed import stage
from medsae.embed.backbones import load_backbone
from medsae.embed.config import EmbedSpec
from medsae.embed.stage import adopt_shards, embed_shards, embed_stage, finish_embed, pending_shards
from medsae.embed.store import open_embeddings

SIZES = (6, 5, 7, 6)  # 24 rows -> 6 shards of 4
SHARD, BATCH = 4, 3
N_SHARDS = -(-sum(SIZES) // SHARD)


class _Counting:
    """A backbone that records how many images it embedded (the tiny ViT underneath)."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.device = inner, inner.name, inner.device
        self.n_images = 0

    def embed(self, images):
        self.n_images += int(images.shape[0])
        return self.inner.embed(images)

    def describe(self):
        return self.inner.describe()


@pytest.fixture
def standin(tmp_path, monkeypatch):
    root = tmp_path / "slices"
    table = make_standin(root, sizes=SIZES)
    monkeypatch.setattr(stage, "load_slices", lambda folder: pd.read_csv(Path(folder) / "standin.csv"))
    monkeypatch.setattr(stage, "iter_scan_images", standin_render)
    return root, table


def _ctx(root: Path, tmp_path: Path, name: str):
    return make_ctx(root, tmp_path / name, tmp_path / f"work_{name}", shard_size=SHARD, batch_size=BATCH, num_workers=0)


def _reference(root: Path, table: pd.DataFrame, tmp_path: Path) -> dict:
    """An uninterrupted run's manifest (the in-process stage, no kill)."""
    embed_stage(_ctx(root, tmp_path, "reference"), table, standin_render)
    return json.loads((tmp_path / "reference" / "manifest.json").read_text())


def _backbone():
    return _Counting(load_backbone(EmbedSpec(**TINY)))


def _rows(shards: list[int]) -> int:
    n = sum(SIZES)
    return sum(min((s + 1) * SHARD, n) - s * SHARD for s in shards)


def _ray_driver_until_killed(ctx, finished_order: list[int]) -> None:
    """What ``RayExecutor._embed`` does, with the tasks finishing in ``finished_order`` and the driver
    killed after recording those (the other shards' tasks never reported)."""
    todo, done = pending_shards(ctx)
    assert todo == list(range(N_SHARDS)) and done == {}
    backbone = _backbone()
    for s in finished_order:
        folder = Path(ctx.work_dir) / "ray" / f"shard-{s:06d}"
        entries, _ = embed_shards(ctx, [s], folder, backbone=backbone)
        adopt_shards(ctx, folder, entries)
    assert backbone.n_images == _rows(finished_order)
    record = Path(ctx.work_dir) / "shards.jsonl"
    assert [json.loads(line)["index"] for line in record.read_text().splitlines()] == finished_order


def _assert_same_artifacts(tmp_path: Path, name: str, ref_manifest: dict) -> None:
    manifest = json.loads((tmp_path / name / "manifest.json").read_text())
    assert manifest["shards"] == ref_manifest["shards"]  # names, rows and sha256, in shard order
    assert [s["file"] for s in manifest["shards"]] == [f"shard_{i:05d}.npy" for i in range(N_SHARDS)]
    for shard in ref_manifest["shards"]:
        assert (tmp_path / name / shard["file"]).read_bytes() == (tmp_path / "reference" / shard["file"]).read_bytes()
    np.testing.assert_array_equal(
        open_embeddings(tmp_path / name).load(), open_embeddings(tmp_path / "reference").load()
    )


def test_ray_path_resumes_with_only_the_shards_it_lacks(standin, tmp_path):
    root, table = standin
    ref_manifest = _reference(root, table, tmp_path)
    ctx = _ctx(root, tmp_path, "ray")
    _ray_driver_until_killed(ctx, [2, 1, 4])  # shard 0 never recorded: the driver was killed

    # the restarted driver: RayExecutor._embed again
    todo, done = pending_shards(ctx)
    assert todo == [0, 3, 5] and sorted(done) == [1, 2, 4]
    backbone = _backbone()
    described = None
    for s in reversed(todo):  # finishing out of order again
        folder = Path(ctx.work_dir) / "ray" / f"shard-{s:06d}"
        entries, described = embed_shards(ctx, [s], folder, backbone=backbone)
        adopt_shards(ctx, folder, entries)
    assert backbone.n_images == _rows([0, 3, 5])  # nothing recorded was embedded again
    assert described is not None
    result = finish_embed(ctx, described, n_new=len(todo))
    assert result.summary["shards"] == N_SHARDS and result.summary["resumed_shards"] == 3
    _assert_same_artifacts(tmp_path, "ray", ref_manifest)


def test_in_process_stage_resumes_over_gaps_and_redoes_a_damaged_shard(standin, tmp_path):
    root, table = standin
    ref_manifest = _reference(root, table, tmp_path)
    ctx = _ctx(root, tmp_path, "mixed")
    _ray_driver_until_killed(ctx, [3, 1, 2, 5])
    damaged = Path(ctx.work_dir) / "shard_00002.npy"  # recorded, but its file no longer matches its sha256
    damaged.write_bytes(damaged.read_bytes()[:-8])

    todo, _ = pending_shards(ctx)
    assert todo == [0, 2, 4]
    rendered: list[int] = []

    def render(slices_dir, slice_ids=None):
        for ids, images in standin_render(slices_dir, slice_ids):
            rendered.extend(int(i) for i in ids)
            yield ids, images

    backbone = _backbone()
    result = embed_stage(ctx, table, render, backbone=backbone)
    ids = table.sort_values("slice_id")["slice_id"].to_numpy()
    expected = [int(i) for s in (0, 2, 4) for i in ids[s * SHARD : (s + 1) * SHARD]]
    assert sorted(rendered) == expected and backbone.n_images == _rows([0, 2, 4])
    assert result.summary["shards"] == N_SHARDS and result.summary["resumed_shards"] == 3
    _assert_same_artifacts(tmp_path, "mixed", ref_manifest)

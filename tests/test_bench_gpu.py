"""bench/gpu.sh's CPU dry run prints every section's table, and the pipelined embed loader changes no number.

The loader tests use a stand-in renderer (scans stored as uint8 .npy stacks, one file read per scan,
the contract of ``medsae.data.render.iter_scan_images``) and a tiny random-init DINOv3-style ViT.
The CUDA paths (pinned memory, non-blocking copies) cannot run here: no GPU on CI.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medsae.embed import loader
from medsae.embed.backbones import load_backbone
from medsae.embed.config import EmbedSpec
from medsae.embed.loader import MAX_AUTO_WORKERS, loader_workers, make_loader, render_rows, split_items
from medsae.embed.stage import embed_stage, work_items
from medsae.embed.store import open_embeddings
from medsae.stage import StageContext

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "source": "timm",
    "model": "vit_small_patch16_dinov3",
    "pretrained": False,
    "model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32},
    "input_size": 32,
    "pooling": "cls+mean",
    "device": "cpu",
}
NUMBER = r"[\d,]+(?:\.\d+)?"


# --------------------------------------------------------------------------------------------
# bench/gpu.sh --device cpu --quick


def _section(out: str, title: str) -> str:
    """The text of the section whose heading starts with ``## title`` (up to the next heading)."""
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", out, flags=re.S | re.M)
    assert match, f"no section '{title}' in:\n{out}"
    return match.group(1)


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _embed_rows(table: str) -> dict[str, tuple[int, float, float, float]]:
    """measure -> (images, seconds, images/s, % of bare) of one embed table."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(NUMBER, cells[1]):
            rows[cells[0]] = (int(cells[1]), float(cells[2]), float(cells[3]), float(cells[4].rstrip("%")))
    return rows


def test_cpu_dry_run_prints_every_section_with_numbers():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "# device cpu" in out and "# torch " in out and "# GPU: none" in out

    # 1. one table per input size: the bare forward and the pipeline embed the same slices
    embed = _section(out, "1. ")
    tables = embed.split("best pipeline / bare = ")
    assert len(tables) == 3, embed  # two tables, each followed by its verdict line
    for table, size in zip(tables[:2], (32, 64), strict=True):
        assert f"input {size}px" in table
        rows = _embed_rows(table)
        bare = rows.pop("bare forward (ready tensors)")
        assert rows and any(name.startswith("full pipeline, 0 worker") for name in rows)
        assert bare[0] > 40 and bare[2] > 0
        for images, seconds, rate, percent in rows.values():
            assert images == bare[0] and rate > 0
            # the printed rate is images / seconds, up to the rounding of the printed seconds (2 decimals)
            assert images / (seconds + 0.006) - 0.06 <= rate <= images / max(seconds - 0.006, 1e-9) + 0.06
            assert percent == pytest.approx(100 * rate / bare[2], rel=1e-2, abs=0.2)

    # 2a. bench/sae.py: trainer rows with samples/s, and the 8-config comparison
    sae = _section(out, "2a. ")
    assert re.search(rf"^medsae trainer, TopK\s+{NUMBER}\s", sae, flags=re.M), sae
    assert re.search(rf"^one pass / sequential\s+{NUMBER}%", sae, flags=re.M), sae
    # 2b. the study's Matryoshka configuration
    matryoshka = _section(out, "2b. ")
    match = re.search(rf"\| medsae trainer, study Matryoshka\s+\|\s+(\d+) \|\s+({NUMBER}) \|", matryoshka)
    assert match and int(match.group(1)) >= 3 and _number(match.group(2)) > 0, matryoshka

    # 3. the Ray executor ran the demo's slices and embed stages (or says ray is missing)
    ray_part = _section(out, "3. ")
    try:
        import ray  # noqa: F401
    except ImportError:
        assert "ray is not installed" in ray_part
    else:
        assert re.search(r"^ran\s+embed\s+[0-9a-f]{12}", ray_part, flags=re.M), ray_part
        assert re.search(rf"^\| ray\s+\|\s+{NUMBER} \|$", ray_part, flags=re.M), ray_part
    assert "## done" in out


# --------------------------------------------------------------------------------------------
# the pipelined loader


def _standin(folder: Path, sizes=(6, 5, 4), size: int = 40) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    rows = []
    for s, n in enumerate(sizes):
        np.save(folder / f"scan_{s}.npy", rng.integers(0, 256, (n, size, size), dtype=np.uint8))
        rows += [(len(rows) + k, "ct", f"s{s}", s, k) for k in range(n)]
    table = pd.DataFrame(rows, columns=["slice_id", "modality", "image_id", "scan", "idx"])
    table.to_csv(folder / "standin.csv", index=False)
    return table


def _render(slices_dir: Path, slice_ids=None):
    """(ids, uint8 images) one scan at a time, in reverse scan order (render_rows puts them back)."""
    table = pd.read_csv(Path(slices_dir) / "standin.csv").set_index("slice_id")
    sub = table.loc[np.asarray(slice_ids)]
    for scan in pd.unique(sub["scan"])[::-1]:
        part = sub[sub["scan"] == scan]
        yield part.index.to_numpy(), np.load(Path(slices_dir) / f"scan_{scan}.npy")[part["idx"].to_numpy()]


def _ctx(root: Path, name: str, **params) -> StageContext:
    (root / name).mkdir(parents=True)
    return StageContext(
        kind="embed",
        key=name,
        spec=EmbedSpec(**{**TINY, **params}),
        out_dir=root / name,
        work_dir=root / f"{name}.work",
        inputs={"slices": root / "slices"},
        input_keys={"slices": "s"},
        seed=0,
        quiet=True,
    )


def test_loader_yields_every_work_item_in_order_with_its_images(tmp_path):
    table = _standin(tmp_path / "slices")
    ids = table["slice_id"].to_numpy(np.int64)
    items = work_items(table["scan"].to_numpy(), 4)  # cut at scans and at every 4 rows
    scans = {s: np.load(tmp_path / "slices" / f"scan_{s}.npy") for s in table["scan"].unique()}
    want = [(a, scans[table.scan[a]][table.idx[a] : table.idx[b - 1] + 1]) for a, b in items]
    assert [b - a for a, b in items] == [4, 2, 2, 3, 1, 3]  # cuts at scans (6, 11) and every 4 rows
    for workers in (0, 2):
        got = list(make_loader(tmp_path / "slices", ids, items, _render, workers, torch.device("cpu")))
        assert [int(start) for start, _ in got] == [a for a, _ in want]
        for (_, images), (_, expected) in zip(got, want, strict=True):
            assert images.dtype == torch.uint8
            np.testing.assert_array_equal(images.numpy(), expected)
    # items cut at 3 rows: the same rows, in order, in pieces of at most 3
    assert split_items(items, 3) == [(0, 3), (3, 4), (4, 6), (6, 8), (8, 11), (11, 12), (12, 15)]
    cut = list(make_loader(tmp_path / "slices", ids, items, _render, 2, torch.device("cpu"), max_rows=3))
    assert [int(start) for start, _ in cut] == [0, 3, 4, 6, 8, 11, 12]
    np.testing.assert_array_equal(
        np.concatenate([images.numpy() for _, images in cut]), np.concatenate([images for _, images in want])
    )


@pytest.mark.parametrize("workers, item_pixels", [(0, None), (2, None), (2, 32 * 32 * 3)])
def test_pipelined_stage_equals_a_direct_forward_of_the_rendered_rows(tmp_path, monkeypatch, workers, item_pixels):
    """0 or 2 render workers, items whole or cut into 4 rows (a batch): the same vectors, the same bytes."""
    table = _standin(tmp_path / "slices")
    if item_pixels:
        monkeypatch.setattr(loader, "MAX_ITEM_PIXELS", item_pixels)
        assert loader.item_rows(32, 4) == 4
    ids = table["slice_id"].to_numpy(np.int64)
    embed_stage(_ctx(tmp_path, "out", num_workers=workers, shard_size=5, batch_size=4), table, _render)
    store = open_embeddings(tmp_path / "out")
    np.testing.assert_array_equal(store.slice_ids, ids)

    backbone = load_backbone(EmbedSpec(**TINY))  # same seed, same weights; every row in one forward
    direct = backbone.embed(render_rows(_render, tmp_path / "slices", ids)).numpy()
    assert direct.shape == (15, 64)
    np.testing.assert_allclose(store.load(), direct, rtol=1e-5, atol=1e-5)
    shards = sorted((tmp_path / "out").glob("shard_*.npy"))
    assert len(shards) == 3
    if workers:  # bytes identical to the in-process loader's on whole items
        monkeypatch.undo()
        embed_stage(_ctx(tmp_path, "w0", num_workers=0, shard_size=5, batch_size=4), table, _render)
        for shard in shards:
            digest = hashlib.sha256((tmp_path / "w0" / shard.name).read_bytes()).hexdigest()
            assert hashlib.sha256(shard.read_bytes()).hexdigest() == digest


def test_auto_workers_follow_the_cpus_medsae_may_use(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for threads, on_gpu, on_cpu in [(1, 1, 0), (2, 1, 0), (4, 3, 1), (64, MAX_AUTO_WORKERS, 1)]:
        monkeypatch.setenv("MEDSAE_THREADS", str(threads))
        assert loader_workers("auto", cuda) == on_gpu
        assert loader_workers("auto", cpu) == on_cpu
    monkeypatch.setenv("MEDSAE_THREADS", "2")
    assert loader_workers(8, cuda) == 2 and loader_workers(0, cuda) == 0 and loader_workers(1, cpu) == 1
    assert EmbedSpec(**TINY, num_workers="auto").num_workers == "auto"
    with pytest.raises(ValueError):
        EmbedSpec(**TINY, num_workers="many")

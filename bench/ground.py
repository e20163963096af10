"""Grounding cost: N latents x 20 top slices with the demo backbone, and the estimate for the study.

    .venv/bin/python bench/ground.py                     # 1,000 latents, demo phantom and backbone, CPU
    .venv/bin/python bench/ground.py --latents 200 --slices 100

Steps: write the demo phantom (24 subjects), run the real ``slices`` stage, then time the three
parts of the ground stage on real slices and masks, each per unit:

* **render**: a slice and the masks of its structures from the NIfTI volumes (``medsae.ground.render``);
* **tokens**: EfficientNet-Lite0 (ImageNet) at 160 px, spatial tokens + the pooled SAE on every token;
* **score**: one latent's 20 maps against every structure present, real and shuffled masks.

A latent's maps come from a random SAE (1,280 -> N latents): the cost does not depend on what the
latents mean. The table gives the time for N latents x 20 slices when every top slice is distinct
(the worst case: top slices of different latents overlap on real data), and extrapolates to 8,192
latents on the full data set (909,873 slices; the union of top slices is at most 163,840).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medsae.data.config import DataSpec
from medsae.data.index import load_structures
from medsae.data.stage import run_slices
from medsae.embed.backbones import load_backbone
from medsae.ground.render import iter_rendered
from medsae.ground.scores import score_structures, shuffle_partners
from medsae.ground.tokens import activation_grid, token_pre_acts, upsample
from medsae.sae.models import SAE, SAEConfig
from medsae.stage import StageContext

TOP = 20
FULL_LATENTS = 8192


def _slices(root: Path) -> Path:
    data = DataSpec(root=str(root / "phantom"), phantom={"subjects": 24, "seed": 0}, size=96, stride=2)
    out = root / "slices"
    ctx = StageContext("slices", "bench", out, root / "slices.work", {}, {}, 0, quiet=True, spec=data)
    out.mkdir(parents=True, exist_ok=True)
    run_slices(ctx)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=int, default=1000)
    parser.add_argument("--slices", type=int, default=200, help="slices rendered and embedded for the per-slice cost")
    parser.add_argument("--score-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="medsae-bench-ground-"))
    try:
        slices_dir = _slices(root)
        structures = load_structures(slices_dir)
        ids = np.unique(np.random.default_rng(0).choice(structures["slice_id"].unique(), args.slices, replace=False))
        t0 = time.perf_counter()
        scans = list(iter_rendered(slices_dir, ids, structures, args.score_size))
        t_render = (time.perf_counter() - t0) / len(ids)
        backbone = load_backbone(
            {"source": "efficientnet_lite0", "pooling": "mean", "input_size": 160, "device": "cpu"}
        )
        g = torch.Generator().manual_seed(0)
        sae = SAE(SAEConfig(d_in=1280, d_sae=args.latents, levels=[args.latents], level_k=[16]), generator=g).eval()
        images = np.concatenate([s.images for s in scans])
        masks = [m for s in scans for m in s.masks]
        t0 = time.perf_counter()
        grids = []
        for start in range(0, len(images), 32):
            feats = backbone.embed_tokens(images[start : start + 32])
            grids.append(activation_grid(token_pre_acts(sae, feats), feats.grid))
        t_tokens = (time.perf_counter() - t0) / len(images)
        grid = torch.cat(grids)  # [n, L, h, w]
        rng = np.random.default_rng(1)
        partners = shuffle_partners(np.zeros(len(images), dtype=int), 0)
        n_score = min(args.latents, 200)
        t0 = time.perf_counter()
        for latent in range(n_score):
            top = rng.choice(len(images), TOP, replace=False)
            maps = upsample(grid[top, latent], args.score_size)
            for rows in (top, partners[top]):
                names = sorted({n for r in rows for n in masks[r]})
                stacks = {
                    n: torch.from_numpy(
                        np.stack([masks[r].get(n, np.zeros((args.score_size,) * 2, bool)) for r in rows])
                    )
                    for n in names
                }
                score_structures(maps, stacks)
        t_score = (time.perf_counter() - t0) / n_score
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = args.latents
    per_slice = t_render + t_tokens
    run = n * TOP * per_slice + n * t_score
    full_slices = FULL_LATENTS * TOP
    full = full_slices * per_slice + FULL_LATENTS * t_score
    h, w = grid.shape[-2:]
    maps_mb = 1000 * h * w * 2 / 1e6  # activation_maps.npz: float16 token-grid maps per (latent, slice)
    rows = [
        ("render slice + masks (ms/slice)", f"{t_render * 1e3:.1f}"),
        ("tokens + pooled SAE on tokens (ms/slice)", f"{t_tokens * 1e3:.1f}"),
        (f"score one latent x {TOP} slices, real + shuffled (ms)", f"{t_score * 1e3:.1f}"),
        (f"{n} latents x {TOP} slices, distinct slices (s)", f"{run:.0f}"),
        (f"{FULL_LATENTS} latents x {TOP} slices, full data set (min, this CPU)", f"{full / 60:.0f}"),
        (f"activation maps stored per 1,000 (latent, slice) pairs ({h}x{w} fp16, MB)", f"{maps_mb:.3f}"),
        (
            "token shard per 1,000 slices at 16 tokens, bf16, d=1280 (MB, not stored)",
            f"{1000 * 16 * 1280 * 2 / 1e6:.1f}",
        ),
        ("token shard per 1,000 slices at 16 tokens, bf16, d=1024 DINOv3-L (MB)", f"{1000 * 16 * 1024 * 2 / 1e6:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"threads {torch.get_num_threads()}, {len(images)} slices rendered, {n_score} latents scored")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10}")


if __name__ == "__main__":
    sys.exit(main())

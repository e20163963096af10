"""The ``ground`` stage: every live latent's activation maps on its top held-out slices vs the structure masks.

1. :mod:`medsae.ground.select` picks the latents (firing on >= ``min_active`` held-out slices) and
   their ``top_slices`` strongest held-out slices from the encode stage's codes;
2. :mod:`medsae.ground.render` renders just those slices and the masks of the structures in them;
3. the backbone gives their spatial tokens (:meth:`TorchBackbone.embed_tokens`) and the SAE is
   applied to every token (:mod:`medsae.ground.tokens`): one activation map per latent and slice. A
   pooled SAE gives its pre-activations per token (route ``pooled_sae_on_tokens``); a token SAE
   (``sae.input: tokens``) its own codes per token (route ``token_sae``);
4. :mod:`medsae.ground.scores` scores each latent against every structure present, and again with
   masks shuffled across slices of the same modality and plane.

Outputs: ``grounding.parquet`` (latent x structure scores), ``activation_maps.npz`` (token-grid
maps, float16) and the best structure per latent as rows of the registry table ``latent_grounding``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medsae.data.index import load_slices, load_structures
from medsae.embed.backbones import load_backbone, resolve_device
from medsae.embed.store import open_embeddings
from medsae.errors import MedsaeError
from medsae.ground.config import GroundRun, GroundSpec
from medsae.ground.render import iter_rendered
from medsae.ground.scores import (
    StructureScores,
    best_structure,
    dominant_structure,
    score_structures,
    shuffle_partners,
)
from medsae.ground.select import TopSlices, top_slices
from medsae.ground.tokens import activation_grid, pooled_pre_acts, token_pre_acts, token_sae_codes, upsample
from medsae.registry.queries import GROUND_MAPS_FILE
from medsae.sae.checkpoint import load_sae
from medsae.sae.codes import load_codes
from medsae.sae.stage import trained_on
from medsae.stage import Metric, StageContext, StageResult

CODE_VERSION = "2"  # 2: masks rendered by the data stage (in the display orientation of the images)
GROUNDING_FILE = "grounding.parquet"
MAPS_FILE = GROUND_MAPS_FILE  # read back by medsae.registry.queries.ground_maps
#: How the maps were made, by what the SAE was trained on (``sae.input``): the ``route`` column.
ROUTES = {"pooled": "pooled_sae_on_tokens", "tokens": "token_sae"}


def run_ground(ctx: StageContext) -> StageResult:
    """Stage entry point (see the module docstring); planned only when ``ground.enabled``."""
    spec = ctx.section(GroundSpec)
    if not isinstance(spec, GroundRun):
        raise MedsaeError("stage ground: expected the ground section with the embed section attached")
    t0 = time.perf_counter()
    slices_dir = Path(ctx.inputs["slices"])
    codes, code_slice_ids = load_codes(ctx.inputs["encode"])
    table = load_slices(slices_dir, columns=["slice_id", "split", "modality", "plane"])
    splits = table["split"].to_numpy(object)[code_slice_ids]
    chosen = top_slices(codes, np.isin(splits, spec.splits), spec.top_slices, spec.min_active, spec.max_latents)
    route = ROUTES[trained_on(ctx.inputs["train"])]
    summary: dict[str, Any] = {"n_latents": int(len(chosen.latents)), "route": route}
    if len(chosen.latents) == 0:
        return StageResult(metrics=[Metric("grounded_latents", 0.0)], summary=summary, device="cpu")
    device = resolve_device(spec.device)
    maps = _token_maps(ctx, spec, chosen, code_slice_ids, device, route)
    meta = table.set_index("slice_id")
    structures = load_structures(slices_dir)
    rows, all_rows = _score_all(spec, chosen, code_slice_ids, maps, meta, structures, route)
    _write_outputs(Path(ctx.out_dir), chosen, code_slice_ids, maps, all_rows)
    summary.update(
        exact=maps.exact,
        token_pool_gap=maps.pool_gap,
        reembed_gap=maps.reembed_gap,
        slices_rendered=len(maps.masks),
        unshuffled_slices=maps.unshuffled,
        seconds=round(time.perf_counter() - t0, 2),
    )
    for r in rows:
        r["sae_key"] = ctx.input_keys["train"]
    return StageResult(
        metrics=_metrics(rows, maps), tables={"latent_grounding": rows}, summary=summary, device=str(device)
    )


class _Maps:
    """Token-grid activation maps per latent (aligned with its top rows) and per-slice masks."""

    def __init__(self, chosen: TopSlices) -> None:
        self.grid: tuple[int, int] = (0, 0)
        self.by_latent: list[np.ndarray | None] = [None] * len(chosen.latents)
        self.masks: dict[int, dict[str, np.ndarray]] = {}
        self.groups: dict[int, str] = {}
        self.exact = True
        self.pool_gap: float | None = 0.0  # max |mean_t z_t - z_pooled| / max |z_pooled|; None: token SAE
        self.reembed_gap = 0.0  # max |pooled now - pooled stored| / max |pooled stored|
        self.unshuffled = 0


def _token_maps(
    ctx: StageContext,
    spec: GroundRun,
    chosen: TopSlices,
    code_slice_ids: np.ndarray,
    device: torch.device,
    route: str,
) -> _Maps:
    """Render the union of top slices, embed their tokens and keep each latent's map on each of its slices.

    Route ``token_sae``: the maps are the token SAE's codes, exact by definition (no pooled check).
    """
    sae = load_sae(ctx.inputs["train"], device)
    backbone = load_backbone(spec.embed, device=str(device))
    store = open_embeddings(ctx.inputs["embed"])
    row_of_slice = {int(s): r for r, s in enumerate(store.slice_ids)}
    wanted: dict[int, list[tuple[int, int]]] = {}  # slice_id -> [(latent position, slot in its top list)]
    for li, rows in enumerate(chosen.rows):
        for slot, r in enumerate(rows):
            wanted.setdefault(int(code_slice_ids[r]), []).append((li, slot))
    out = _Maps(chosen)
    token_sae = route == ROUTES["tokens"]
    if token_sae:
        out.pool_gap = None
    structures = load_structures(ctx.inputs["slices"])
    slice_ids = np.fromiter(wanted, dtype=np.int64)
    scans = iter_rendered(ctx.inputs["slices"], slice_ids, structures, spec.score_size)
    for scan in ctx.progress(scans, description="ground: render + tokens"):
        for i, sid in enumerate(scan.slice_ids):
            out.masks[int(sid)] = scan.masks[i]
        for start in range(0, len(scan.slice_ids), spec.batch_size):
            ids = scan.slice_ids[start : start + spec.batch_size]
            feats = backbone.embed_tokens(scan.images[start : start + spec.batch_size])
            out.exact = out.exact and (token_sae or feats.exact)
            out.grid = feats.grid
            stored = torch.from_numpy(store.load(np.asarray([row_of_slice[int(s)] for s in ids])))
            out.reembed_gap = max(out.reembed_gap, _relative_gap(feats.pooled.cpu(), stored))
            latents = sorted({li for s in ids for li, _ in wanted[int(s)]})
            cols = torch.as_tensor(chosen.latents[latents], device=device)
            if token_sae:
                z_tok = token_sae_codes(sae, feats, cols)
            else:
                z_tok = token_pre_acts(sae, feats, cols)
                z_pool = pooled_pre_acts(sae, feats.pooled, cols)
                out.pool_gap = max(out.pool_gap, _relative_gap(z_tok.mean(dim=1).cpu(), z_pool.cpu()))
            grid = activation_grid(z_tok, feats.grid).cpu().numpy()  # [n, L, h, w]
            col_of = {li: c for c, li in enumerate(latents)}
            for i, sid in enumerate(ids):
                for li, slot in wanted[int(sid)]:
                    if out.by_latent[li] is None:
                        out.by_latent[li] = np.zeros((len(chosen.rows[li]), *feats.grid), dtype=np.float32)
                    out.by_latent[li][slot] = grid[i, col_of[li]]
    return out


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a.float() - b.float()).abs().max()) / scale if scale > 0 else 0.0


def _score_all(
    spec: GroundRun,
    chosen: TopSlices,
    code_slice_ids: np.ndarray,
    maps: _Maps,
    meta: pd.DataFrame,
    structures: pd.DataFrame,
    route: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Registry rows (best structure per latent) and every latent x structure score."""
    pool = np.fromiter(maps.masks, dtype=np.int64)
    groups = (meta.loc[pool, "modality"].astype(str) + "/" + meta.loc[pool, "plane"].astype(str)).to_numpy()
    partners = shuffle_partners(groups, spec.shuffle_seed)
    partner_of = {int(s): int(pool[p]) for s, p in zip(pool, partners, strict=True)}
    maps.unshuffled = int(np.sum(partners == np.arange(len(pool))))
    present = structures[structures["slice_id"].isin(pool)]
    areas = {int(s): dict(zip(g["structure"], g["pixels"], strict=True)) for s, g in present.groupby("slice_id")}
    rows, all_rows = [], []
    size = spec.score_size
    for li, latent in enumerate(chosen.latents):
        sids = [int(code_slice_ids[r]) for r in chosen.rows[li]]
        a = upsample(torch.from_numpy(maps.by_latent[li]), size)
        real = score_structures(a, _stack(maps.masks, sids, size), spec.thresholds)
        best = best_structure(real)
        shuffled_sids = [partner_of[s] for s in sids]
        shuffled_all = score_structures(a, _stack(maps.masks, shuffled_sids, size), spec.thresholds)
        dom, dom_share = dominant_structure([areas.get(s, {}) for s in sids])
        for s in real:
            all_rows.append({"latent": int(latent), **s.__dict__, "best": best is not None and s is best})
        if best is None:
            continue
        same = score_structures(a, _stack(maps.masks, shuffled_sids, size, only=best.structure), spec.thresholds)
        shuffled = same[0] if same else _empty(best.structure)
        shuffled_best = best_structure(shuffled_all)
        rows.append(
            {
                "latent": int(latent),
                "structure": best.structure,
                "n_slices": len(sids),
                "n_present": best.n_present,
                "lift": _num(best.lift),
                "iou": best.iou,
                "dice": best.dice,
                "threshold": best.threshold,
                "pointing": _num(best.pointing),
                "lift_shuffled": _num(shuffled.lift),
                "iou_shuffled": shuffled.iou,
                "dice_shuffled": shuffled.dice,
                "pointing_shuffled": _num(shuffled.pointing),
                "iou_shuffled_best": shuffled_best.iou if shuffled_best else 0.0,
                "dominant_structure": dom,
                "dominant_share": dom_share,
                "route": route,
                "exact": maps.exact,
            }
        )
    return rows, all_rows


def _stack(
    masks: dict[int, dict[str, np.ndarray]], sids: list[int], size: int, only: str | None = None
) -> dict[str, torch.Tensor]:
    """Per structure present on any of ``sids``, its masks ``[N, size, size]`` (False where absent)."""
    names = {only} if only is not None else {n for s in sids for n in masks[s]}
    out = {}
    for name in sorted(names):
        stack = np.zeros((len(sids), size, size), dtype=bool)
        for i, s in enumerate(sids):
            m = masks[s].get(name)
            if m is not None:
                stack[i] = m
        out[name] = torch.from_numpy(stack)
    return out


def _empty(name: str) -> StructureScores:
    return StructureScores(name, math.nan, 0.0, 0.0, math.nan, math.nan, 0)


def _num(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _metrics(rows: list[dict[str, Any]], maps: _Maps) -> list[Metric]:
    frame = pd.DataFrame(rows)
    n = len(frame)
    out = [
        Metric("grounded_latents", float(n), n=n),
        Metric("token_pool_gap", maps.pool_gap, n=n, extra={"exact": maps.exact}),
        Metric("reembed_gap", maps.reembed_gap, n=n),
    ]
    for col in ("lift", "iou", "dice", "pointing"):
        for suffix in ("", "_shuffled"):
            values = pd.to_numeric(frame[col + suffix], errors="coerce").dropna()
            value = float(values.median()) if len(values) else None
            out.append(Metric(f"ground_{col}{suffix}_median", value, n=len(values)))
    beats = (frame["iou"] > frame["iou_shuffled_best"]).mean() if n else None
    out.append(Metric("ground_iou_beats_shuffled_fraction", None if beats is None else float(beats), n=n))
    return out


def _write_outputs(
    out_dir: Path, chosen: TopSlices, code_slice_ids: np.ndarray, maps: _Maps, all_rows: list[dict[str, Any]]
) -> None:
    """``grounding.parquet`` and the token-grid maps (float16; slice ids -1 where a latent has fewer slices)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(all_rows).to_parquet(out_dir / GROUNDING_FILE, index=False)
    width = max(len(r) for r in chosen.rows)
    h, w = maps.grid
    stacked = np.zeros((len(chosen.latents), width, h, w), dtype=np.float16)
    ids = np.full((len(chosen.latents), width), -1, dtype=np.int64)
    for li, rows in enumerate(chosen.rows):
        stacked[li, : len(rows)] = maps.by_latent[li]
        ids[li, : len(rows)] = code_slice_ids[rows]
    with open(out_dir / MAPS_FILE, "wb") as fh:
        np.savez_compressed(fh, latents=chosen.latents, slice_ids=ids, maps=stacked)

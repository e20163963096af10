"""The activation map of any latent on any slice of an experiment, computed on demand.

The slice is rendered again as the embed stage saw it, the backbone gives its spatial tokens
(:meth:`TorchBackbone.embed_tokens`), the experiment's pooled SAE is applied to every token
(:mod:`medsae.ground.tokens`) and the ReLU'd token pre-activations of the latent are upsampled to
the slice's pixels. No ground stage is needed; ``medsae latent map`` writes the picture.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsae.errors import MedsaeError
from medsae.registry import Registry, queries


@dataclass
class LatentMap:
    """One latent's activation on one slice."""

    experiment: str
    latent: int
    slice_id: int
    image: np.ndarray  # uint8 [S, S]: the slice as the backbone saw it
    token_map: np.ndarray  # float32 [h, w]: max(0, token pre-activation), a token SAE: its codes; token grid
    pixels: np.ndarray  # float32 [S, S]: token_map bilinearly upsampled to the slice's pixels
    pooled_pre_act: float  # the SAE's pre-activation of the slice's pooled vector
    token_mean_pre_act: float  # mean over tokens of the token pre-activations (= pooled when exact)
    exact: bool  # pooled vector == mean of the tokens (mean pooling); False for CLS pooling


def latent_map(registry: Registry, experiment: str, latent: int, slice_id: int, device: str = "cpu") -> LatentMap:
    """Compute the map of ``latent`` on ``slice_id`` (one-line errors for an unknown experiment, latent or slice)."""
    from medsae.data.render import render_index, render_slice
    from medsae.embed.backbones import load_backbone, resolve_device
    from medsae.ground.picture import map_on_pixels
    from medsae.ground.tokens import activation_grid, pooled_pre_acts, token_pre_acts, token_sae_codes
    from medsae.sae.checkpoint import load_sae
    from medsae.sae.stage import trained_on

    exp = queries.find_experiment(registry, experiment)
    name = exp["name"]
    slices_dir = queries.stage_folder(registry, exp, "slices")
    train_dir = queries.stage_folder(registry, exp, "train")
    embed = (json.loads(exp["spec_json"] or "{}") or {}).get("embed")
    if not isinstance(embed, dict):
        raise MedsaeError(f"experiment '{name}': its spec has no embed section (cannot rebuild the backbone)")
    dev = resolve_device(device)
    sae = load_sae(train_dir, dev)
    if not 0 <= latent < sae.cfg.d_sae:
        raise MedsaeError(f"latent {latent}: experiment '{name}' has latents 0..{sae.cfg.d_sae - 1}")
    n_slices = len(render_index(slices_dir).axis)
    if not 0 <= slice_id < n_slices:
        raise MedsaeError(f"slice {slice_id}: experiment '{name}' has slices 0..{n_slices - 1}")
    image = render_slice(slices_dir, slice_id)
    backbone = load_backbone({**embed, "device": str(dev)}, device=str(dev))
    feats = backbone.embed_tokens(image[None])
    cols = torch.as_tensor([latent], device=dev)
    if trained_on(train_dir) == "tokens":  # a token SAE: its own codes of every token, as the ground stage
        z_tokens = token_sae_codes(sae, feats, cols)  # [1, T, 1]
    else:
        z_tokens = token_pre_acts(sae, feats, cols)  # [1, T, 1]
    token_map = activation_grid(z_tokens, feats.grid)[0, 0].cpu().numpy()
    return LatentMap(
        experiment=name,
        latent=latent,
        slice_id=slice_id,
        image=image,
        token_map=token_map,
        pixels=map_on_pixels(token_map, image.shape[0]),
        pooled_pre_act=float(pooled_pre_acts(sae, feats.pooled, cols)[0, 0]),
        token_mean_pre_act=float(z_tokens.mean(dim=1)[0, 0]),
        exact=feats.exact,
    )


def write_map_png(m: LatentMap, path: Path) -> Path:
    """The slice with the map over it and its colour bar (values: max(0, pre-activation)), written atomically."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from medsae.ground.picture import CMAP, heat_overlay

    vmax = float(m.pixels.max())
    fig = Figure(figsize=(4.6, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(heat_overlay(m.image, m.pixels, vmax), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{m.experiment} · latent {m.latent} · slice {m.slice_id}", fontsize=9)
    bar = fig.colorbar(ScalarMappable(Normalize(0, vmax if vmax > 0 else 1), colormaps[CMAP]), ax=ax, shrink=0.8)
    bar.set_label("max(0, token pre-activation)", fontsize=8)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".map-", suffix=".png", dir=path.parent)
    except OSError as exc:
        raise MedsaeError(f"{path}: cannot write the map: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

"""Pictures of where a latent fires: its activation map over the slice, and a structure's outline.

Composed pixel by pixel with numpy (no plotting library decides a pixel), so what the report and
``medsae latent map`` show is exactly the map the grounding scores were computed from:

* :func:`map_on_pixels` - a token-grid map bilinearly upsampled to the slice's pixels (the
  scoring code's :func:`medsae.ground.tokens.upsample`, so pixels and scores agree);
* :func:`heat_overlay` - the slice in grey with the map on top: colour from :data:`CMAP` at
  ``v / vmax`` and opacity ``MAX_ALPHA · v / vmax`` (where the latent is silent the slice shows);
* :func:`colour_bar` - the colour scale of the overlay, ``vmax`` at the top, 0 at the bottom;
* :func:`mask_outline` - the slice in grey with the boundary pixels of a mask in :data:`OUTLINE_RGB`.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from medsae.ground.tokens import upsample

#: Matplotlib colour map of the heat overlay and its colour bar.
CMAP = "inferno"
#: Opacity of the heat map where the latent is at its maximum (0 where it is silent).
MAX_ALPHA = 0.65
#: Colour of a mask's outline.
OUTLINE_RGB = (0, 255, 255)


def map_on_pixels(token_map: np.ndarray, size: int) -> np.ndarray:
    """A token-grid map ``[h, w]`` as float32 ``[size, size]`` on the slice's pixels (bilinear, >= 0)."""
    return upsample(torch.as_tensor(np.asarray(token_map, dtype=np.float32)), size).numpy()


def heat_colours(values01: np.ndarray) -> np.ndarray:
    """RGB (float, 0-255) of values in [0, 1] under :data:`CMAP`."""
    from matplotlib import colormaps

    return colormaps[CMAP](np.clip(values01, 0, 1), bytes=True)[..., :3].astype(np.float64)


def heat_overlay(image: np.ndarray, amap: np.ndarray, vmax: float) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]``: the uint8 slice ``[H, W]`` under the map ``[H, W]`` scaled by ``vmax``."""
    if image.shape != amap.shape:
        raise ValueError(f"slice {image.shape} and map {amap.shape} differ in shape")
    v = np.clip(np.asarray(amap, dtype=np.float64) / vmax, 0, 1) if vmax > 0 else np.zeros(amap.shape)
    alpha = MAX_ALPHA * v[..., None]
    grey = np.asarray(image, dtype=np.float64)[..., None]
    return np.rint((1 - alpha) * grey + alpha * heat_colours(v)).astype(np.uint8)


def colour_bar(height: int, width: int = 10) -> np.ndarray:
    """uint8 RGB ``[height, width, 3]`` of the overlay's colours: the maximum at the top row, 0 at the bottom."""
    ramp = np.linspace(1, 0, height)[:, None].repeat(width, axis=1)
    return np.rint(heat_colours(ramp)).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """bool: the pixels of ``mask`` with a 4-neighbour outside it (or on the image border)."""
    from scipy.ndimage import binary_erosion

    mask = np.asarray(mask, dtype=bool)
    return mask & ~binary_erosion(mask, border_value=0)


def mask_outline(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]``: the slice in grey with the outline of ``mask`` in :data:`OUTLINE_RGB`."""
    rgb = np.repeat(np.asarray(image, dtype=np.uint8)[..., None], 3, axis=2)
    rgb[outline(mask)] = OUTLINE_RGB
    return rgb


def png_bytes(pixels: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 grey ``[H, W]`` or RGB ``[H, W, 3]`` array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()

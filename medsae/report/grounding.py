"""The grounding panel of a latent card: where the latent fires on a slice, beside its best structure.

For a latent the ground stage scored, the panel shows one of its top held-out slices (the
strongest one that contains the latent's best structure) twice: with the stored activation map
upsampled and laid over it as a heat map (with its colour bar), and with the outline of the best
structure's mask. The pictures are composed by :mod:`medsae.ground.picture` and embedded as PNG
data URLs; the mask is rendered again from its segmentation file (:mod:`medsae.ground.render`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsae.plots import png_data_url
from medsae.report.gather import GroundingData

log = logging.getLogger("medsae")

#: Scores shown in the panel: (column of latent_grounding, its shuffled-mask baseline column, label).
SCORE_ROWS = (
    ("lift", "lift_shuffled", "lift"),
    ("iou", "iou_shuffled", "IoU"),
    ("dice", "dice_shuffled", "Dice"),
    ("pointing", "pointing_shuffled", "pointing game"),
)
#: Height in pixels of the colour bar image.
BAR_HEIGHT = 64


@dataclass
class GroundingView:
    """What a card shows of its latent's grounding."""

    structure: str
    scores: list[dict[str, Any]]  # label, value, shuffled
    n_slices: int
    n_present: int
    exact: bool
    slice_id: int | None = None
    overlay: str | None = None  # PNG data URL: heat map over the slice
    outline: str | None = None  # PNG data URL: best structure's outline on the slice
    bar: str | None = None  # PNG data URL: colour bar (top = vmax, bottom = 0)
    vmax: float | None = None
    notes: list[str] = field(default_factory=list)


def grounding_views(data: GroundingData, slices_dir: str | None) -> dict[int, GroundingView]:
    """latent -> its panel, for every latent with a ``latent_grounding`` row in ``data``."""
    views = {}
    for latent, row in data.rows.items():
        view = GroundingView(
            structure=str(row["structure"]),
            scores=[{"label": lab, "value": row.get(c), "shuffled": row.get(s)} for c, s, lab in SCORE_ROWS],
            n_slices=int(row.get("n_slices") or 0),
            n_present=int(row.get("n_present") or 0),
            exact=bool(row.get("exact")),
        )
        if not view.exact:
            view.notes.append("CLS pooling: token maps approximate the pooled code")
        _add_pictures(view, data, latent, slices_dir)
        views[latent] = view
    return views


def choose_slice(ids: np.ndarray, present: dict[int, set[str]], structure: str) -> int | None:
    """Position in ``ids`` (strongest first) of the first slice containing ``structure``, or None."""
    return next((i for i, s in enumerate(ids) if structure in present.get(int(s), ())), None)


def _add_pictures(view: GroundingView, data: GroundingData, latent: int, slices_dir: str | None) -> None:
    from medsae.ground.picture import colour_bar, heat_overlay, map_on_pixels, mask_outline, png_bytes

    if latent not in data.maps:
        view.notes.append("no stored activation map for this latent")
        return
    ids, maps = data.maps[latent]
    at = choose_slice(ids, data.present, view.structure)
    if at is None:
        view.notes.append(f"none of its top slices contains {view.structure}")
        return
    if not slices_dir or not Path(slices_dir).is_dir():
        view.notes.append(f"pictures unavailable: slices artifact folder {slices_dir or '(none)'} not found")
        return
    view.slice_id = int(ids[at])
    try:
        image, mask = slice_and_mask(slices_dir, view.slice_id, view.structure)
    except Exception as exc:  # a bad volume must not sink the whole report; the card says why
        log.warning("report: grounding picture of latent %d failed (%s)", latent, exc)
        view.notes.append(f"pictures unavailable: {type(exc).__name__}: {exc}")
        return
    amap = map_on_pixels(maps[at], image.shape[0])
    view.vmax = float(amap.max())
    view.overlay = png_data_url(png_bytes(heat_overlay(image, amap, view.vmax)))
    view.outline = png_data_url(png_bytes(mask_outline(image, mask)))
    view.bar = png_data_url(png_bytes(colour_bar(BAR_HEIGHT)))


def slice_and_mask(slices_dir: str | Path, slice_id: int, structure: str) -> tuple[np.ndarray, np.ndarray]:
    """The slice as the backbone saw it (uint8 ``[S, S]``) and the structure's mask on the same pixels."""
    from medsae.data.render import render_index
    from medsae.ground.render import iter_rendered

    size = render_index(slices_dir).options.size
    wanted = pd.DataFrame({"slice_id": [int(slice_id)], "structure": [structure], "pixels": [1]})
    (scan,) = list(iter_rendered(slices_dir, np.asarray([slice_id]), wanted, score_size=size))
    return scan.images[0], scan.masks[0].get(structure, np.zeros((size, size), dtype=bool))

"""Grounding scores of one latent's activation maps against structure masks (docs/method.md#grounding).

Inputs: the latent's maps ``A`` on its top slices (``[N, S, S]``, >= 0, upsampled to the scoring
grid) and, per structure, its masks on the same slices (``[N, S, S]`` bool, all False where the
structure is absent). Every slice weighs the same.

* **lift**: ``mean_n(mass inside the mask / mass) / mean_n(mask area / slice area)``, over slices
  where the latent has any mass. 1 = no preference for the structure (a uniform map scores exactly
  1), above 1 = activation concentrated in it.
* **IoU / Dice at the best threshold**: the map is cut at ``q · max(A)`` for ``q = 1/(Q+1) ...
  Q/(Q+1)`` (one threshold for all N slices); intersection and union are summed over the slices
  (network dissection's data-set IoU); the best ``q`` is kept (Dice peaks at the same ``q``).
* **pointing game**: share of the slices containing the structure (and with any mass) whose
  map's maximum lies inside the mask.

The shuffled-mask baseline runs the same functions with each slice's masks taken from another
slice of the same modality and plane (:func:`shuffle_partners`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class StructureScores:
    """One latent against one structure."""

    structure: str
    lift: float
    iou: float
    dice: float
    threshold: float  # the best q (fraction of the latent's maximum activation)
    pointing: float
    n_present: int  # slices (of the N) where the structure has a mask


def score_structures(
    maps: torch.Tensor | np.ndarray, masks: Mapping[str, torch.Tensor | np.ndarray], thresholds: int = 19
) -> list[StructureScores]:
    """Scores of one latent's maps ``[N, S, S]`` against each structure's masks (module docstring).

    One pass over the mask pixels: each inside pixel adds its activation to its (structure, slice)
    mass and its threshold bin to its structure's histogram, so the cost grows with the mask area,
    not with structures x thresholds x pixels.
    """
    if not masks:
        return []
    names = sorted(masks)
    n_slices, k_count = maps.shape[0], len(names)
    a = np.maximum(np.asarray(maps, dtype=np.float64).reshape(n_slices, -1), 0)
    pixels = a.shape[1]
    inside_pixels = [np.flatnonzero(np.asarray(masks[n])) for n in names]
    flat = np.concatenate(inside_pixels)  # flat index (slice * pixels + pixel) of every inside pixel
    k_of = np.repeat(np.arange(k_count), [len(p) for p in inside_pixels])
    slice_of = flat // pixels
    a_flat = a.reshape(-1)
    mass = a.sum(axis=1)
    valid = mass > 0
    # lift: per (structure, slice) activation mass and area inside the mask
    key = k_of * n_slices + slice_of
    inside = np.bincount(key, weights=a_flat[flat], minlength=k_count * n_slices).reshape(k_count, n_slices)
    area = np.bincount(key, minlength=k_count * n_slices).reshape(k_count, n_slices) / pixels
    n_valid = max(int(valid.sum()), 1)
    mean_share = (inside[:, valid] / mass[valid]).sum(axis=1) / n_valid
    mean_area = area[:, valid].sum(axis=1) / n_valid
    with np.errstate(invalid="ignore", divide="ignore"):
        lift = np.where(mean_area > 0, mean_share / mean_area, math.nan)
    # best-threshold IoU / Dice: bin b(p) = ceil(a (Q+1) / peak) - 1, so a > q peak / (Q+1)  <=>  b >= q
    peak = float(a.max())
    q = np.arange(1, thresholds + 1) / (thresholds + 1)
    if peak > 0:
        bins = np.clip(np.ceil(a_flat * (thresholds + 1) / peak) - 1, -1, thresholds).astype(np.int64) + 1
    else:
        bins = np.zeros(a_flat.shape, dtype=np.int64)
    width = thresholds + 2
    joint = np.bincount(k_of * width + bins[flat], minlength=k_count * width).reshape(k_count, width)
    inter = _at_or_above(joint).astype(np.float64)  # [K, Q]
    size_b = _at_or_above(np.bincount(bins, minlength=width))[None]  # [1, Q]
    size_m = joint.sum(axis=1, keepdims=True)
    union, total = size_m + size_b - inter, size_m + size_b
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
        dice = np.where(total > 0, 2 * inter / total, 0.0)
    if peak <= 0:  # nothing fires: no threshold is meaningful
        iou, dice = np.zeros_like(iou), np.zeros_like(dice)
    best = iou.argmax(axis=1)
    # pointing game: is each slice's maximum inside the mask (slices with the structure and any mass)
    top = a.argmax(axis=1) + np.arange(n_slices) * pixels  # flat index of each slice's peak
    hit = np.zeros((k_count, n_slices), dtype=bool)
    is_top = np.isin(flat, top)
    hit[k_of[is_top], slice_of[is_top]] = True
    present = area > 0
    counted = present & valid[None]
    n_counted = counted.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        pointing = np.where(n_counted > 0, (hit & counted).sum(axis=1) / n_counted, math.nan)
    return [
        StructureScores(
            structure=name,
            lift=float(lift[k]),
            iou=float(iou[k, best[k]]),
            dice=float(dice[k, best[k]]),
            threshold=float(q[best[k]]),
            pointing=float(pointing[k]),
            n_present=int(present[k].sum()),
        )
        for k, name in enumerate(names)
    ]


def _at_or_above(hist: np.ndarray) -> np.ndarray:
    """Counts of bins ``>= q`` for ``q = 1..Q`` from a histogram over ``[-1, 0, 1..Q]`` (stored shifted by one)."""
    return hist[..., ::-1].cumsum(axis=-1)[..., ::-1][..., 2:]


def best_structure(scores: list[StructureScores]) -> StructureScores | None:
    """The structure with the highest IoU (ties: the higher lift, then the name)."""
    if not scores:
        return None
    return max(scores, key=lambda s: (s.iou, -math.inf if math.isnan(s.lift) else s.lift, _reverse(s.structure)))


def _reverse(name: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in name)


def shuffle_partners(groups: np.ndarray, seed: int) -> np.ndarray:
    """For each item, another item of the same group (a random cyclic shift within the group).

    An item alone in its group is its own partner (its masks are not shuffled); the caller counts those.
    """
    rng = np.random.default_rng(seed)
    partners = np.arange(len(groups))
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        if len(members) < 2:
            continue
        order = rng.permutation(members)
        partners[order] = np.roll(order, 1)  # no item keeps its own masks
    return partners


def dominant_structure(areas: list[Mapping[str, int]]) -> tuple[str | None, float]:
    """The structure that is the largest in most slices, and the share of slices where it is."""
    winners = [max(a.items(), key=lambda kv: (kv[1], kv[0]))[0] for a in areas if a]
    if not winners:
        return None, 0.0
    names, counts = np.unique(np.asarray(winners), return_counts=True)
    i = int(np.argmax(counts))
    return str(names[i]), float(counts[i]) / len(areas)

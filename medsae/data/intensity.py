"""Intensity mapping of volumes to 8-bit: CT windows by study type, MRI percentile clipping.

Every mapping is stored as four numbers per scan, ``(clip_lo, clip_hi, out_lo, out_hi)``:
``u8 = floor((clip(v, clip_lo, clip_hi) - out_lo) / (out_hi - out_lo) * 255)``. Ingest computes
them once (they need the whole volume: min/max, percentiles) and records them in ``scans.parquet``;
rendering reuses them, so every image the embed stage or a thumbnail shows is mapped identically.

* CT (docs/method.md#ct-slices): window (centre c, width w) looked up by normalised study type in the study's
  table of 38 types (docs/method.md#ct-windows); unknown types use the spec's default window and are recorded
  (``window_source = 'default'``) instead of dropping the scan as the study did. The clipped
  volume is rescaled by its own min/max (``ct_scaling='volume'``, the study's skimage default) or
  by the window limits (``ct_scaling='window'``, scan-independent contrast).
* MRI (docs/method.md#mri-slices): clip to the 1st..99th percentile of voxels > 0, rescale by those limits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

#: study type (normalised) -> (centre, width) in HU; docs/method.md#ct-windows (38 rows)
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "ct thorax-abdomen-pelvis": (-100, 1400),
    "ct neck-thorax-abdomen-pelvis": (-100, 1400),
    "ct abdomen-pelvis": (50, 1000),
    "ct thorax-neck": (-200, 1400),
    "ct polytrauma": (-50, 1400),
    "ct thorax-abdomen": (-100, 1400),
    "ct whole body": (-50, 1400),
    "ct pelvis": (80, 1400),
    "ct thorax-chest": (-200, 1400),
    "ct thorax": (-200, 1400),
    "ct chest": (-200, 1400),
    "ct abdomen": (50, 1000),
    "ct neck": (50, 1000),
    "ct head": (40, 400),
    "ct polytrauma head": (40, 400),
    "ct orbita": (60, 1000),
    "ct headbasis-felsenleg": (120, 1200),
    "ct gesichtshead": (120, 1200),
    "ct angiography neck-thx-abd-pelvis-leg": (120, 1000),
    "ct angiography head": (100, 900),
    "ct angiography pelvis-leg": (120, 1000),
    "ct angiography thorax-abdomen-pelvis": (120, 1000),
    "ct angiography abdomen-pelvis-leg": (120, 1000),
    "ct angiography abdomen-pelvis": (120, 1000),
    "ct angiography thorax": (100, 1000),
    "ct angiography neck": (100, 900),
    "ct heart-thorakale aorta": (120, 1000),
    "ct aortic valve": (120, 1000),
    "ct heart": (120, 1000),
    "ct left artrium": (120, 1000),
    "ct coronary arteries": (120, 1000),
    "ct spine": (200, 2000),
    "ct upper leg left": (200, 2000),
    "ct hip right": (200, 2000),
    "ct upper limb both": (200, 2000),
    "ct lower limb left": (200, 2000),
    "ct intervention": (50, 1000),
    "ct operation": (50, 1000),
}


def normalise_study_type(study_type: object) -> str:
    """Trim, lower-case and collapse whitespace (the study's matching rule)."""
    if study_type is None or (isinstance(study_type, float) and np.isnan(study_type)):
        return ""
    return re.sub(r"\s+", " ", str(study_type).strip().lower())


def ct_window(study_type: object, default: tuple[float, float]) -> tuple[float, float, str]:
    """``(centre, width, source)`` for a study type; source is 'table' or 'default'."""
    key = normalise_study_type(study_type)
    if key in CT_WINDOWS:
        c, w = CT_WINDOWS[key]
        return float(c), float(w), "table"
    return float(default[0]), float(default[1]), "default"


@dataclass(frozen=True)
class IntensityMap:
    """``u8 = floor((clip(v, clip_lo, clip_hi) - out_lo) / (out_hi - out_lo) * 255)``."""

    clip_lo: float
    clip_hi: float
    out_lo: float
    out_hi: float

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Map any array of raw intensities to uint8 (vectorised, float32 maths).

        One float32 working copy, updated in place: a study-sized CT needs the volume plus one copy.
        """
        span = self.out_hi - self.out_lo
        if span <= 0:
            return np.zeros(values.shape, dtype=np.uint8)
        v = np.clip(values.astype(np.float32, copy=False), self.clip_lo, self.clip_hi)  # a new array
        v -= np.float32(self.out_lo)
        v *= np.float32(255.0 / span)
        np.clip(v, 0, 255, out=v)
        return v.astype(np.uint8)


def ct_map(volume: np.ndarray, centre: float, width: float, scaling: str = "volume") -> IntensityMap:
    """CT window ``[c - w/2, c + w/2]``; rescaled by the clipped volume's min/max or the window."""
    lo, hi = centre - width / 2.0, centre + width / 2.0
    if scaling == "window":
        return IntensityMap(lo, hi, lo, hi)
    vmin, vmax = float(volume.min()), float(volume.max())
    return IntensityMap(lo, hi, min(max(vmin, lo), hi), min(max(vmax, lo), hi))


def mri_map(volume: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> IntensityMap:
    """Clip to the given percentiles of voxels > 0 and rescale by them (docs/method.md#mri-slices)."""
    positive = volume[volume > 0]
    if positive.size == 0:
        return IntensityMap(0.0, 0.0, 0.0, 0.0)
    p_lo, p_hi = np.percentile(positive, percentiles)
    return IntensityMap(float(p_lo), float(p_hi), float(p_lo), float(p_hi))

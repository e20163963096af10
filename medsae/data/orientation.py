"""How a slice is turned into an upright picture: one canonical display for every source, or the study's.

A slice along array axis ``a`` is ``vol.take(i, axis=a)`` with rows and columns the two remaining
axes in increasing order (:mod:`medsae.data.slicing`). Two conventions turn it into an image
(docs/method.md#orientation):

* ``radiological`` (default): the volume is first reoriented to the closest RAS orientation, so a
  slice's rows and columns point to known world directions whatever the storage, and every plane
  is shown as a radiologist reads it: axial seen from the feet (anterior up, the patient's right
  on the image's left), coronal seen from the front (superior up, patient's right on the left),
  sagittal seen from the patient's left (superior up, anterior on the left). On a RAS grid all
  three are "rotate 90° counter-clockwise, then mirror left-right".
* ``stored`` (the study, ``data.preset: study``): rotate the stored axes 90° counter-clockwise and
  mirror slices along axes 0 and 1. The picture then depends on how the file was stored: the same
  head stored RAS and LPS comes out rotated 180° in axial and mirrored in coronal and sagittal.

2-D images (PNG, JPEG, TIFF, single-image DICOM) are shown as stored, in both conventions.
"""

from __future__ import annotations

import numpy as np

from medsae.data.slicing import to_display as study_display

ORIENTATIONS = ("radiological", "stored")


def radiological_display(images: np.ndarray) -> np.ndarray:
    """Slices ``[n, rows, cols]`` of a RAS grid in radiological view (any of the three planes)."""
    return np.ascontiguousarray(np.rot90(images, k=1, axes=(1, 2))[:, :, ::-1])


def display(images: np.ndarray, axis: int, orientation: str) -> np.ndarray:
    """Slices ``[n, rows, cols]`` taken along ``axis`` as upright pictures in ``orientation``."""
    if orientation == "radiological":
        return radiological_display(images)
    if orientation == "stored":
        return study_display(images, axis)
    raise ValueError(f"unknown orientation {orientation!r} (known: {', '.join(ORIENTATIONS)})")

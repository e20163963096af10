"""2-D images (PNG, JPEG, TIFF; 8- or 16-bit; grey or RGB) as one-slice volumes, and their masks.

A 2-D image enters the index as a volume of shape ``[1, rows, cols]`` sliced once along axis 0:
no planes, no reorientation, shown as stored. Colour images become grey (ITU-R 601-2 luma, PIL's
'L'), since every backbone sees one grey channel replicated. Windowing is off: 8-bit images keep
their values; deeper ones (16-bit, 32-bit, float) are stretched linearly from the image's minimum
to its maximum (docs/method.md#images-2d). Masks are 2-D label images or binary images of the same
size (palette PNGs give their palette indices).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsae.data.intensity import IntensityMap
from medsae.data.volume import ScanError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: PIL modes read as they are (one channel); any other mode is converted to 8-bit grey
_DIRECT_MODES = {"L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def is_image_file(path: str | Path) -> bool:
    """Whether the name ends like a 2-D image medsae reads."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def _open(path: Path):
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
    except Exception as exc:  # missing, truncated or not an image: one line
        text = str(exc).strip().splitlines()
        raise ScanError(f"cannot read image {path.name}: {type(exc).__name__}: {text[0] if text else ''}") from None
    if getattr(img, "n_frames", 1) > 1:
        raise ScanError(f"image {path.name} has {img.n_frames} pages or frames (one 2-D image expected)")
    return img


def read_image(path: Path) -> np.ndarray:
    """An image as ``[1, rows, cols]`` in its stored depth (uint8, uint16, int32 or float32)."""
    img = _open(path)
    if img.mode not in _DIRECT_MODES:
        img = img.convert("L")
    array = np.asarray(img)
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    return array[None, :, :]


def read_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D mask or label image as ``[1, rows, cols]`` integer values and an identity affine."""
    img = _open(path)
    if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        raise ScanError(f"mask {path.name} is a colour image ({img.mode}); masks are grey label or binary images")
    if img.mode == "LA":
        img = img.getchannel("L")
    array = np.asarray(img.convert("L") if img.mode == "1" else img)
    return array[None, :, :], np.eye(4)


def image_map(array: np.ndarray) -> IntensityMap:
    """Windowing off: 8-bit values unchanged, other depths stretched from the image's min to its max."""
    if array.dtype == np.uint8:
        return IntensityMap(0.0, 255.0, 0.0, 255.0)
    lo, hi = float(np.min(array)), float(np.max(array))
    return IntensityMap(lo, hi, lo, hi)

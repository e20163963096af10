"""PNG files of the explorer: a content-addressed store (``thumbs/<sha256>.png``) and small histograms.

Every picture is written once under the SHA-256 of its bytes and referenced by that name, so a
slice shown on many latent pages costs one file, and pages never inline image data. Slice
thumbnails come from a cache that outlives builds (:mod:`medsae.report.site.thumbcache`) and are
hard-linked from it (copied across file systems).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from pathlib import Path

import numpy as np

THUMBS = "thumbs"


class ImageStore:
    """Writes PNG bytes into ``root/thumbs/<sha256>.png`` (once) and returns the path relative to ``root``."""

    def __init__(self, root: Path) -> None:
        self.folder = Path(root) / THUMBS
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written: set[str] = set()

    def put(self, png: bytes) -> str:
        digest = hashlib.sha256(png).hexdigest()
        if digest not in self.written:
            path = self.folder / f"{digest}.png"
            if not path.is_file():
                path.write_bytes(png)
            self.written.add(digest)
        return f"{THUMBS}/{digest}.png"

    def put_file(self, source: Path, png: bytes) -> str:
        """Like :meth:`put` for bytes read from the file ``source``: hard-linked from there (no second
        copy on disk), or copied where a link cannot be made (another file system, no permission)."""
        digest = hashlib.sha256(png).hexdigest()
        if digest not in self.written:
            path = self.folder / f"{digest}.png"
            try:
                os.link(source, path)
            except FileExistsError:
                pass
            except OSError:
                path.write_bytes(png)
            self.written.add(digest)
        return f"{THUMBS}/{digest}.png"

    def put_data_url(self, url: str | None) -> str | None:
        """Store a ``data:image/png;base64,...`` URL's bytes (None stays None)."""
        if not url:
            return None
        return self.put(base64.b64decode(url.split(",", 1)[1]))


def histogram_png(values: np.ndarray, bins: int = 30, width: int = 300, height: int = 90) -> tuple[bytes, dict]:
    """A bar chart of ``values`` as PNG bytes, and its axis facts (lo, hi, peak count, n) for the caption.

    Drawn with PIL (no matplotlib): thousands of pages need it to take about a millisecond.
    """
    from PIL import Image, ImageDraw

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    counts, _ = np.histogram(values, bins=bins, range=(lo, hi))
    peak = int(counts.max()) if counts.size else 0
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    bar = width / bins
    for i, c in enumerate(counts):
        if c:
            top = height - 1 - max(1, round((height - 4) * c / peak))
            draw.rectangle(
                [round(i * bar), top, max(round(i * bar), round((i + 1) * bar) - 2), height - 1], fill=(31, 111, 235)
            )
    draw.line([0, height - 1, width, height - 1], fill=(90, 100, 110))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), {"lo": lo, "hi": hi, "peak": peak, "n": int(values.size)}

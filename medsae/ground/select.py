"""Which latents are grounded, and on which slices: the top held-out slices of each live latent."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class TopSlices:
    """Per grounded latent, its top rows of the codes matrix (strongest first)."""

    latents: np.ndarray  # int64 [L], ascending
    rows: list[np.ndarray]  # per latent: int64 code rows, highest pooled code first (ties: lower row)
    values: list[np.ndarray]  # per latent: float32 pooled codes of those rows


def top_slices(
    codes: sp.csr_matrix, keep_rows: np.ndarray, top: int, min_active: int, max_latents: int | None
) -> TopSlices:
    """Latents firing on at least ``min_active`` rows among ``keep_rows`` (bool [n]) and their ``top`` rows.

    With ``max_latents``, only the most frequent latents (ties: lower index) are kept.
    """
    csc = sp.csc_matrix(codes[np.flatnonzero(keep_rows)])
    held = np.flatnonzero(keep_rows)
    csc.eliminate_zeros()
    counts = np.diff(csc.indptr)
    live = np.flatnonzero(counts >= min_active)
    if max_latents is not None and len(live) > max_latents:
        order = np.lexsort((live, -counts[live]))
        live = np.sort(live[order[:max_latents]])
    rows, values = [], []
    for j in live:
        lo, hi = csc.indptr[j], csc.indptr[j + 1]
        r, v = csc.indices[lo:hi], csc.data[lo:hi]
        order = np.lexsort((r, -v))[:top]
        rows.append(held[r[order]].astype(np.int64))
        values.append(v[order].astype(np.float32))
    return TopSlices(live.astype(np.int64), rows, values)

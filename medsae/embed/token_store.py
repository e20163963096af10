"""A sample of spatial tokens per slice, stored as bf16 shards beside the pooled embedding shards.

Storing every token of 909,873 slices is out of reach (a 14 x 14 grid of 384-d tokens is 196 x the
pooled vectors), so with ``embed.tokens_per_slice: k`` the embed stage keeps ``k`` grid tokens
of each slice (the token vectors of :mod:`medsae.embed.tokens`, in the pooled vector's space):

* ``uniform``: ``k`` distinct grid positions, uniformly;
* ``foreground``: ``k`` distinct positions drawn with probability proportional to the share of
  non-zero pixels under each token (plus :data:`BACKGROUND_WEIGHT`, so air is rare but possible).

Each slice draws with ``numpy.random.default_rng([token_seed, slice_id])``: the sample of a slice
does not depend on batching, shards or resumes. Layout next to ``shard_NNNNN.npy``::

    tokens_NNNNN.npy      uint16 [rows, k, d]: the bf16 bit patterns of the tokens (numpy has no bf16)
    token_pos_NNNNN.npy   int16 [rows, k]: their grid positions (row-major index into h x w), ascending

and ``manifest.json`` gains ``tokens: {per_slice, grid, sampling, seed, dtype, shards: [...]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsae.embed.store import MANIFEST, _atomic_save, sha256_file
from medsae.errors import MedsaeError, MissingInputError

#: Sampling weight of a token over pure background (relative to 1 for a token over foreground only).
BACKGROUND_WEIGHT = 1e-3


def token_shard_names(index: int) -> tuple[str, str]:
    return f"tokens_{index:05d}.npy", f"token_pos_{index:05d}.npy"


def to_bf16_bits(x: torch.Tensor) -> np.ndarray:
    """float tensor -> uint16 array of its bfloat16 bit patterns (round to nearest even)."""
    return x.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 (exact: bf16 is the top half of a float32)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def foreground_share(images: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """float64 ``[n, h*w]``: share of non-zero pixels of each uint8 image ``[n, H, W]`` under each token."""
    import torch.nn.functional as F

    fg = (images > 0).float()[:, None]
    return F.adaptive_avg_pool2d(fg, grid).flatten(1).double().cpu().numpy()


def sample_positions(
    slice_ids: np.ndarray, n_grid: int, k: int, sampling: str, seed: int, share: np.ndarray | None = None
) -> np.ndarray:
    """int16 ``[n, min(k, n_grid)]`` distinct grid positions per slice, ascending (module docstring)."""
    k = min(k, n_grid)
    out = np.empty((len(slice_ids), k), dtype=np.int16)
    for i, sid in enumerate(slice_ids):
        rng = np.random.default_rng([int(seed), int(sid)])
        p = None
        if sampling == "foreground":
            assert share is not None
            w = share[i] + BACKGROUND_WEIGHT
            p = w / w.sum()
        out[i] = np.sort(rng.choice(n_grid, size=k, replace=False, p=p))
    return out


def sample_tokens(
    spatial: torch.Tensor, images: torch.Tensor, slice_ids: np.ndarray, k: int, sampling: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The stored sample of a batch: bf16 bits ``[n, k, d]`` and positions ``[n, k]``.

    ``spatial`` is the batch's grid tokens ``[n, h, w, d]`` (:attr:`TokenFeatures.spatial`),
    ``images`` the uint8 slices ``[n, H, W]`` they came from.
    """
    n, h, w, d = spatial.shape
    share = foreground_share(images, (h, w)) if sampling == "foreground" else None
    pos = sample_positions(slice_ids, h * w, k, sampling, seed, share)
    index = torch.as_tensor(pos.astype(np.int64), device=spatial.device)
    picked = torch.gather(spatial.reshape(n, h * w, d), 1, index[..., None].expand(-1, -1, d))
    return to_bf16_bits(picked.float()), pos


def write_token_shard(folder: Path, index: int, bits: np.ndarray, positions: np.ndarray) -> dict[str, Any]:
    """Write one token shard pair atomically; returns its manifest entry."""
    tok_name, pos_name = token_shard_names(index)
    _atomic_save(Path(folder) / tok_name, np.ascontiguousarray(bits, dtype=np.uint16))
    _atomic_save(Path(folder) / pos_name, np.ascontiguousarray(positions, dtype=np.int16))
    return {
        "tokens_file": tok_name,
        "tokens_sha256": sha256_file(Path(folder) / tok_name),
        "pos_file": pos_name,
        "pos_sha256": sha256_file(Path(folder) / pos_name),
    }


@dataclass
class TokenStore:
    """Reader of the stored token sample of an embed folder."""

    folder: Path
    meta: dict[str, Any]

    @property
    def per_slice(self) -> int:
        return int(self.meta["per_slice"])

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.meta["grid"]
        return int(h), int(w)

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 tokens ``[rows, k, d]`` and int16 positions ``[rows, k]`` of shard ``index``."""
        entry = self.meta["shards"][index]
        paths = [self.folder / entry["tokens_file"], self.folder / entry["pos_file"]]
        for p in paths:
            if not p.is_file():
                raise MissingInputError(f"embed: token shard {p} is missing")
        return from_bf16_bits(np.load(paths[0], mmap_mode="r")), np.load(paths[1])

    def __len__(self) -> int:
        return len(self.meta["shards"])


def open_tokens(embed_dir: str | Path) -> TokenStore:
    """The token sample of an embed folder; one line if the stage stored none (``tokens_per_slice: 0``)."""
    folder = Path(embed_dir)
    manifest = json.loads((folder / MANIFEST).read_text())
    meta = manifest.get("tokens")
    if not meta:
        raise MedsaeError(f"{folder}: no stored tokens (set embed.tokens_per_slice > 0 and rerun embed)")
    return TokenStore(folder, meta)

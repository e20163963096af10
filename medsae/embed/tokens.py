"""Spatial tokens next to the pooled vector: where in a slice a backbone's representation sits.

A backbone's last representation is a token sequence (ViT: prefix tokens, then a square grid of
patch tokens) or a feature map (CNN: ``[C, H, W]``). :func:`token_features` turns it into one
vector per spatial position **in the pooled vector's space**, chosen so that the pooled vector is
their mean whenever the pooling is a mean (docs/method.md#spatial-tokens):

=============  ============================================================  ======================
pooling        token vectors (T of them; the last ``h*w`` form the grid)      pooled == mean(tokens)
=============  ============================================================  ======================
``mean``       every token (prefix + patches) / every map position            exact
``mean_patch`` the patch tokens                                               exact
``cls+mean``   ``[cls, patch_t]`` (the CLS half repeats on every token)      exact
``cls``        the patch tokens                                               approximation
``pooler``     the patch tokens / map positions                               checked numerically
=============  ============================================================  ======================

Because an SAE's pre-activations are affine in its input (and the stored normalisations are
affine once the slice's own scale is fixed, see :mod:`medsae.ground.tokens`), the mean over tokens
of the token pre-activations then equals the pooled pre-activation. For CLS pooling the patch
tokens are only a stand-in for the CLS token; ``exact`` is False and grounding says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medsae.embed.backbones import Features, pool_features
from medsae.errors import MedsaeError

#: Relative tolerance of the numerical check that a ``pooler`` output is the mean of the tokens.
POOLER_MEAN_RTOL = 1e-4


@dataclass
class TokenFeatures:
    """Pooled vectors and the token vectors they pool, for one batch of images."""

    pooled: torch.Tensor  # [n, D] float32: exactly what the embed stage stores for these images
    tokens: torch.Tensor  # [n, T, D] float32 token vectors in the pooled vector's space
    grid: tuple[int, int]  # (h, w): tokens[:, T - h*w:] are the spatial grid, row-major, image orientation
    exact: bool  # pooled == tokens.mean(1) by construction (up to float summation order)

    @property
    def spatial(self) -> torch.Tensor:
        """The grid tokens ``[n, h, w, D]``."""
        h, w = self.grid
        return self.tokens[:, self.tokens.shape[1] - h * w :].reshape(self.tokens.shape[0], h, w, -1)


def _square_side(n: int, name: str) -> int:
    side = math.isqrt(n)
    if side * side != n or side == 0:
        raise MedsaeError(f"embed: {name} gives {n} patch tokens, not a square grid (cannot map them to pixels)")
    return side


def _is_mean(tokens: torch.Tensor, pooled: torch.Tensor) -> bool:
    mean = tokens.mean(dim=1)
    scale = float(pooled.abs().max()) if pooled.numel() else 0.0
    return bool(torch.allclose(mean, pooled, rtol=POOLER_MEAN_RTOL, atol=POOLER_MEAN_RTOL * max(scale, 1e-12)))


def token_features(features: Features, pooling: str, name: str = "backbone") -> TokenFeatures:
    """Pooled vectors (the embed stage's :func:`pool_features`) and their token vectors (module table)."""
    pooled = pool_features(features, pooling, name)
    t = features.tokens.float()
    if t.ndim == 4:  # CNN map [B, C, H, W]
        b, c, h, w = t.shape
        tokens = t.permute(0, 2, 3, 1).reshape(b, h * w, c)
        exact = pooling in ("mean", "mean_patch") or (pooling == "pooler" and _is_mean(tokens, pooled))
        return TokenFeatures(pooled, tokens, (h, w), exact)
    patches = t[:, features.n_prefix :]
    side = _square_side(patches.shape[1], name)
    if pooling == "pooler" and features.pooled is None:
        pooling = "cls" if features.has_cls else "mean"  # what pool_features did
    if pooling == "mean":
        return TokenFeatures(pooled, t, (side, side), True)
    if pooling == "mean_patch":
        return TokenFeatures(pooled, patches, (side, side), True)
    if pooling == "cls+mean":
        cls = t[:, :1].expand(-1, patches.shape[1], -1)
        return TokenFeatures(pooled, torch.cat([cls, patches], dim=2), (side, side), True)
    exact = pooling == "pooler" and _is_mean(patches, pooled)  # e.g. timm's DINOv3 head = patch mean
    return TokenFeatures(pooled, patches, (side, side), exact)

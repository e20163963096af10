"""BiomedParse's FocalNet: a checkpoint in BiomedParse's own key layout maps onto timm's FocalNet.

The test builds the backbone the way BiomedParse / SEEM lay it out (channels-last Linear layers,
post-norm blocks with ``gamma_1``/``gamma_2``, a downsample at the end of each stage, output norms
``norm0..norm3``), written here from the architecture, fills it with random numbers, saves its
state dict under ``backbone.`` next to unrelated decoder tensors, and checks that the adapter's
1536-d vectors equal this reference's mean of the ``norm3`` tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medsae.embed.backbones import load_backbone
from medsae.embed.biomedparse import FOCAL_ARGS
from medsae.errors import MedsaeError

DEPTHS = (1, 1, 2, 1)  # BiomedParse has (2, 2, 18, 2); widths (192 -> 1536) are the real ones
MLP_RATIO = 1.0  # BiomedParse has 4; smaller keeps the test checkpoint small
LEVELS, WINDOW = 4, 3


class RefModulation(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.f = nn.Linear(dim, 2 * dim + LEVELS + 1)
        self.h = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Linear(dim, dim)
        self.focal_layers = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, dim, 2 * k + WINDOW, padding=(2 * k + WINDOW) // 2, groups=dim, bias=False),
                nn.GELU(),
            )
            for k in range(LEVELS)
        )

    def forward(self, x):  # [B, H, W, C]
        c = x.shape[-1]
        q, ctx, gates = torch.split(self.f(x).permute(0, 3, 1, 2), (c, c, LEVELS + 1), dim=1)
        ctx_all = 0
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, level : level + 1]
        ctx_all = ctx_all + F.gelu(ctx.mean(dim=(2, 3), keepdim=True)) * gates[:, LEVELS:]
        ctx_all = ctx_all / (LEVELS + 1)  # scaling modulator
        return self.proj((q * self.h(ctx_all)).permute(0, 2, 3, 1))


class RefMlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, int(dim * MLP_RATIO)), nn.Linear(int(dim * MLP_RATIO), dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.modulation, self.mlp = RefModulation(dim), RefMlp(dim)
        self.gamma_1 = nn.Parameter(torch.full((dim,), 1e-4))
        self.gamma_2 = nn.Parameter(torch.full((dim,), 1e-4))

    def forward(self, x, h, w):  # [B, L, C], post-norm variant
        b, n, c = x.shape
        x = x + self.gamma_1 * self.norm1(self.modulation(x.view(b, h, w, c)).view(b, n, c))
        return x + self.gamma_2 * self.norm2(self.mlp(x))


class RefEmbed(nn.Module):
    def __init__(self, cin: int, cout: int, stem: bool):
        super().__init__()
        self.patch = 4 if stem else 2
        k, s, p = (7, 4, 2) if stem else (3, 2, 1)
        self.proj, self.norm = nn.Conv2d(cin, cout, k, s, p), nn.LayerNorm(cout)

    def forward(self, x):  # pads right/bottom to a multiple of the patch size, like SEEM
        x = F.pad(x, (0, (-x.shape[-1]) % self.patch, 0, (-x.shape[-2]) % self.patch))
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RefStage(nn.Module):
    def __init__(self, dim: int, depth: int, last: bool):
        super().__init__()
        self.blocks = nn.ModuleList(RefBlock(dim) for _ in range(depth))
        self.downsample = None if last else RefEmbed(dim, 2 * dim, stem=False)


class RefFocalNet(nn.Module):
    def __init__(self, dim: int = 192):
        super().__init__()
        self.patch_embed = RefEmbed(3, dim, stem=True)
        self.layers = nn.ModuleList(RefStage(dim * 2**i, d, i == 3) for i, d in enumerate(DEPTHS))
        for i in range(4):
            self.add_module(f"norm{i}", nn.LayerNorm(dim * 2**i))

    def forward(self, x):
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        for i, stage in enumerate(self.layers):
            for block in stage.blocks:
                x = block(x, h, w)
            out = getattr(self, f"norm{i}")(x)
            if stage.downsample is not None:
                x = stage.downsample(x.transpose(1, 2).reshape(x.shape[0], -1, h, w))
                h, w = x.shape[-2:]
                x = x.flatten(2).transpose(1, 2)
        return out  # norm3 tokens [B, L, 1536]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    ref = RefFocalNet().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # every number random, so any mis-mapped tensor shows
            is_norm_scale = "norm" in name and name.endswith("weight")
            scale = 0.3 if is_norm_scale or "gamma" in name else 0.05
            p.copy_(torch.randn_like(p) * scale + (1.0 if is_norm_scale else 0.0))
    state = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    state["sem_seg_head.predictor.class_embed"] = torch.randn(4, 4)  # the rest of BiomedParse's model
    state["sem_seg_head.pixel_decoder.adapter_1.weight"] = torch.randn(8, 8)
    path = tmp_path_factory.mktemp("bmp") / "biomedparse_v1.pt"
    torch.save(state, path)
    return ref, path


def _spec(path, **extra):
    return {
        "source": "biomedparse",
        "model": str(path),
        "input_size": 38,
        "device": "cpu",
        "model_kwargs": {"depths": list(DEPTHS), "mlp_ratio": MLP_RATIO},
        **extra,
    }


def test_biomedparse_checkpoint_maps_onto_timm_focalnet(reference):
    ref, path = reference
    backbone = load_backbone(_spec(path))  # model = the local checkpoint file
    images = np.random.default_rng(0).integers(0, 256, (2, 38, 38), dtype=np.uint8)  # 38: not a multiple of 4
    got = backbone.embed(images).numpy()
    assert got.shape == (2, 1536)
    x = torch.from_numpy(images).float()[:, None].repeat(1, 3, 1, 1) / 255  # independent preprocessing
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        tokens = ref(x).numpy()
    assert tokens.shape == (2, 4, 1536)  # 38 -> pad 40 -> 10 -> 5 -> 3 -> 2 tokens per side
    expected = tokens.mean(axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.abs(got[0] - got[1]).max() > 1e-2

    same = load_backbone(_spec("microsoft/BiomedParse", weights=str(path), pooling="mean"))
    np.testing.assert_allclose(same.embed(images).numpy(), got, rtol=1e-6, atol=1e-6)


def test_a_checkpoint_missing_backbone_tensors_is_one_line(reference, tmp_path):
    ref, _ = reference
    state = {f"backbone.{k}": v for k, v in ref.state_dict().items() if ".mlp." not in k}
    torch.save(state, tmp_path / "cut.pt")
    with pytest.raises(MedsaeError) as err:
        load_backbone(_spec(tmp_path / "cut.pt"))
    assert "missing" in str(err.value) and "\n" not in str(err.value)


def test_random_init_control_has_biomedparse_shape():
    backbone = load_backbone(
        {
            "source": "biomedparse",
            "pretrained": False,
            "init": "trunc_normal",
            "device": "cpu",
            "input_size": 32,
            "model_kwargs": {"depths": [1, 1, 1, 1], "mlp_ratio": 1.0},
        }
    )
    assert backbone.embed(np.zeros((1, 32, 32), dtype=np.uint8)).shape == (1, 1536)
    assert FOCAL_ARGS["depths"] == (2, 2, 18, 2) and FOCAL_ARGS["embed_dim"] * 8 == 1536

"""The study-grid sweep files expand into the study's 28 configurations per backbone."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from medsae.sae.config import STUDY_PRESET
from medsae.spec import load_specs

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = [[16, 64, 256, 1024], [32, 128, 512, 2048], [64, 256, 1024, 4096], [128, 512, 2048, 8192]]
PATTERNS = [
    [5, 5, 5, 5],
    [10, 10, 10, 10],
    [20, 20, 20, 20],
    [30, 30, 30, 30],
    [5, 10, 20, 40],
    [10, 20, 40, 80],
    [20, 40, 80, 160],
    [30, 60, 120, 240],
]


@pytest.mark.parametrize("backbone", ["dinov3", "biomedparse"])
def test_study_grid_expands_to_the_28_study_configs(backbone: str):
    specs = load_specs(ROOT / "experiments" / f"study_grid_{backbone}.yaml")
    expected = {
        (tuple(levels), tuple(ks))
        for levels, ks in itertools.product(FAMILIES, PATTERNS)
        if all(k <= size for k, size in zip(ks, levels, strict=True))
    }
    assert len(expected) == 28
    assert len(specs) == 28
    assert {(tuple(s.sae.levels), tuple(s.sae.level_k)) for s in specs} == expected
    assert len({s.name for s in specs}) == 28
    for spec in specs:
        for name, value in STUDY_PRESET.items():
            assert getattr(spec.sae, name) == value, (spec.name, name)
    # one embedding and one training pass shared by the whole grid
    assert len({s.embed.model_dump_json() for s in specs}) == 1
    assert len({(s.sae.batch_size, s.sae.epochs, s.sae.shuffle, s.sae.seed, s.seed) for s in specs}) == 1
    assert specs[0].data.root == "data/TotalSegmentator"


def test_backbone_settings():
    dino = load_specs(ROOT / "experiments" / "study_grid_dinov3.yaml")[0].embed
    assert (dino.source, dino.model, dino.pooling, dino.input_size, dino.precision) == (
        "transformers",
        "facebook/dinov3-vitl16-pretrain-lvd1689m",
        "pooler",
        1024,
        "bf16",
    )
    bmp = load_specs(ROOT / "experiments" / "study_grid_biomedparse.yaml")[0].embed
    assert (bmp.source, bmp.pooling, bmp.input_size) == ("biomedparse", "mean", 1024)

"""Grounding scores against brute-force numpy definitions, and a hand-built SAE whose latent is a mask.

The reference functions below loop over thresholds and slices in plain numpy, written from the
definitions in docs/method.md#grounding, not from the vectorised code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsae.embed.tokens import TokenFeatures
from medsae.ground.scores import best_structure, dominant_structure, score_structures, shuffle_partners
from medsae.ground.tokens import activation_grid, token_pre_acts, upsample
from medsae.sae.models import SAE, SAEConfig


def ref_lift(a: np.ndarray, m: np.ndarray) -> float:
    valid = a.reshape(len(a), -1).sum(1) > 0
    share = [(a[n] * m[n]).sum() / a[n].sum() for n in np.flatnonzero(valid)]
    area = [m[n].mean() for n in np.flatnonzero(valid)]
    return float(np.mean(share) / np.mean(area)) if np.mean(area) > 0 else math.nan


def ref_iou(a: np.ndarray, m: np.ndarray, q_count: int) -> tuple[float, float, float]:
    best = (-1.0, 0.0, 0.0)
    for q in range(1, q_count + 1):
        b = a > q / (q_count + 1) * a.max()
        inter, union = np.logical_and(b, m).sum(), np.logical_or(b, m).sum()
        iou = inter / union if union else 0.0
        dice = 2 * inter / (b.sum() + m.sum()) if b.sum() + m.sum() else 0.0
        if iou > best[0]:
            best = (iou, dice, q / (q_count + 1))
    return best


def ref_pointing(a: np.ndarray, m: np.ndarray) -> float:
    hits = [m[n].reshape(-1)[np.argmax(a[n])] for n in range(len(a)) if m[n].any() and a[n].sum() > 0]
    return float(np.mean(hits)) if hits else math.nan


def test_scores_match_brute_force_definitions():
    rng = np.random.default_rng(0)
    n, s = 6, 16
    a = np.maximum(rng.normal(size=(n, s, s)), 0).astype(np.float32)
    a[2] = 0  # a slice where the latent is silent: left out of lift and pointing
    masks = {
        "liver": rng.random((n, s, s)) < 0.3,
        "spleen": rng.random((n, s, s)) < 0.05,
        "heart": np.zeros((n, s, s), dtype=bool),
    }
    masks["heart"][4, 3:9, 3:9] = True  # present on one slice only
    got = {
        r.structure: r
        for r in score_structures(torch.from_numpy(a), {k: torch.from_numpy(v) for k, v in masks.items()}, 9)
    }
    assert sorted(got) == ["heart", "liver", "spleen"]
    for name, m in masks.items():
        iou, dice, thr = ref_iou(a, m, 9)
        r = got[name]
        assert r.lift == pytest.approx(ref_lift(a, m), rel=1e-6)
        assert r.iou == pytest.approx(iou, rel=1e-6) and r.dice == pytest.approx(dice, rel=1e-6)
        assert r.threshold == pytest.approx(thr)
        assert r.pointing == pytest.approx(ref_pointing(a, m)) or (
            math.isnan(r.pointing) and math.isnan(ref_pointing(a, m))
        )
        assert r.n_present == int(m.reshape(n, -1).any(1).sum())


def _indicator_sae(d: int) -> SAE:
    """Latent 0 reads feature 0, latent 1 reads feature 1 (a constant on every token), no bias, no normalisation."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2, levels=[2], level_k=[1], normalize="none"))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, 0] = 1.0
        sae.W_enc[1, 1] = 1.0
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_a_latent_that_is_a_mask_indicator_grounds_in_that_mask_and_a_uniform_one_has_lift_one():
    rng = np.random.default_rng(1)
    n, grid, size = 8, 8, 64
    yy, xx = np.mgrid[:grid, :grid]
    region = np.zeros((n, grid, grid), dtype=bool)  # one ellipse per slice on the token grid
    for i in range(n):
        cy, cx, ry, rx = rng.uniform(2, 6), rng.uniform(2, 6), rng.uniform(1.2, 3), rng.uniform(1.2, 3)
        region[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    tokens = np.zeros((n, grid * grid, 4), dtype=np.float32)
    tokens[..., 0] = region.reshape(n, -1)  # feature 0 = inside the region
    tokens[..., 1] = 1.0  # feature 1 = everywhere
    tokens[..., 2:] = rng.normal(size=(n, grid * grid, 2))
    tok = torch.from_numpy(tokens)
    feats = TokenFeatures(tok.mean(1), tok, (grid, grid), True)
    maps = upsample(activation_grid(token_pre_acts(_indicator_sae(4), feats), feats.grid), size)  # [n, 2, 64, 64]
    block = size // grid
    mask = torch.from_numpy(np.kron(region, np.ones((block, block), dtype=bool)))  # the region at pixel size
    other = torch.from_numpy(np.roll(mask.numpy(), size // 2, axis=2) & ~mask.numpy())
    indicator = {r.structure: r for r in score_structures(maps[:, 0], {"organ": mask, "elsewhere": other})}
    assert indicator["organ"].iou >= 0.9
    assert indicator["organ"].pointing == 1.0 and indicator["organ"].lift > 2
    assert best_structure(list(indicator.values())).structure == "organ"
    uniform = score_structures(maps[:, 1], {"organ": mask, "elsewhere": other})
    for r in uniform:
        assert r.lift == pytest.approx(1.0, abs=1e-6)


def test_shuffle_partners_stay_in_their_group_and_never_keep_their_own_masks():
    groups = np.array(["ct/axial"] * 5 + ["ct/coronal"] * 3 + ["mri/axial"])
    partners = shuffle_partners(groups, seed=3)
    assert sorted(partners[:5]) == [0, 1, 2, 3, 4] and sorted(partners[5:8]) == [5, 6, 7]
    assert all(partners[i] != i for i in range(8)) and partners[8] == 8  # a lone slice keeps its own
    assert np.array_equal(groups[partners], groups)


def test_dominant_structure_is_the_most_frequent_largest():
    areas = [{"liver": 90, "kidney_left": 10}, {"liver": 50, "spleen": 60}, {"liver": 70}, {}]
    assert dominant_structure(areas) == ("liver", 0.5)
    assert dominant_structure([{}, {}]) == (None, 0.0)

"""SAE activations, losses and gradients against independent references (numpy / plain dense autograd)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsae.sae import ops
from medsae.sae.config import STUDY_PRESET, SAESpec
from medsae.sae.models import SAE, SAEConfig
from medsae.sae.train import lr_at

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(d_in: int = 12, **spec) -> SAEConfig:
    return SAEConfig.from_spec(SAESpec(**spec), d_in)


def _sae(d_in: int = 12, seed: int = 0, **spec) -> SAE:
    sae = SAE(_cfg(d_in, **spec), torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-trivial biases so every term of the formulas is exercised
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc.copy_(0.05 * torch.randn(sae.d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(sae.d_in, generator=g))
    return sae


def _np(sae: SAE) -> dict[str, np.ndarray]:
    return {
        "W": sae.W_enc.detach().double().numpy(),
        "D": sae.decoder_weight.detach().double().numpy(),
        "be": sae.b_enc.detach().double().numpy(),
        "bd": sae.b_dec.detach().double().numpy(),
    }


def _np_pre(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return (x - p["bd"]) @ p["W"].T + p["be"]


def _np_topk_mask(z: np.ndarray, k: int) -> np.ndarray:
    idx = np.argsort(-z, axis=1, kind="stable")[:, :k]
    mask = np.zeros_like(z, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def _np_batch_topk_mask(z: np.ndarray, k_total: int) -> np.ndarray:
    flat = np.argsort(-z.reshape(-1), kind="stable")[:k_total]
    mask = np.zeros(z.size, dtype=bool)
    mask[flat] = True
    return mask.reshape(z.shape)


def _x(n: int = 40, d: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32))


# -- selections -------------------------------------------------------------------------------


def test_topk_select_matches_numpy():
    z = torch.from_numpy(np.random.default_rng(0).normal(size=(30, 50)).astype(np.float32))
    sel = ops.topk_select(z, 7)
    got = np.zeros(z.shape, dtype=bool)
    got[sel.rows.numpy(), sel.cols.numpy()] = True
    assert np.array_equal(got, _np_topk_mask(z.numpy(), 7))
    assert np.all(np.diff(sel.rows.numpy()) >= 0)
    assert np.array_equal(sel.offsets.numpy(), np.arange(30) * 7)


@pytest.mark.parametrize("skew", [0.0, 6.0])
def test_batch_topk_select_matches_numpy(skew: float):
    z = np.random.default_rng(1).normal(size=(25, 60)).astype(np.float32)
    z[3] += skew  # one row holding far more than its share forces the exact re-search path
    sel = ops.batch_topk_select(torch.from_numpy(z), 4 * 25)
    got = np.zeros(z.shape, dtype=bool)
    got[sel.rows.numpy(), sel.cols.numpy()] = True
    expected = _np_batch_topk_mask(z, 100)
    assert np.array_equal(got, expected)
    assert got.sum() == 100
    counts = np.bincount(sel.rows.numpy(), minlength=25)
    assert np.array_equal(sel.offsets.numpy(), np.concatenate([[0], np.cumsum(counts)[:-1]]))
    if skew:
        assert counts[3] > 16  # more than the first-stage candidate count of 4·k


# -- inference activations ------------------------------------------------------------------


def test_topk_encode_matches_numpy():
    sae = _sae(arch="topk", d_sae=40, k=5)
    x = sae.normalize(_x())
    p = _np(sae)
    z = _np_pre(p, x.double().numpy())
    expected = np.where(_np_topk_mask(z, 5), np.maximum(z, 0), 0)
    np.testing.assert_allclose(sae.encode(x).detach().numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(sae.decode(sae.encode(x)).detach().numpy(), expected @ p["D"] + p["bd"], atol=1e-5)


@pytest.mark.parametrize("mode", ["jumprelu", "shifted_relu"])
def test_threshold_inference_matches_numpy(mode: str):
    sae = _sae(arch="batchtopk", d_sae=40, k=5, threshold_inference=mode, threshold_warmup=3)
    x = sae.normalize(_x())
    z = _np_pre(_np(sae), x.double().numpy())
    # before θ is estimated: per-sample top-k fallback
    np.testing.assert_allclose(
        sae.encode(x).detach().numpy(), np.where(_np_topk_mask(z, 5), np.maximum(z, 0), 0), atol=1e-5
    )
    for v in (0.02, 0.05, 0.08):
        sae.observe_threshold(torch.tensor(v))
    theta = float(sae.threshold)
    expected = z * (z > theta) if mode == "jumprelu" else np.maximum(z - theta, 0)
    np.testing.assert_allclose(sae.encode(x).detach().numpy(), expected, atol=1e-5)


def test_threshold_estimates_match_numpy():
    values = [0.3, math.inf, 0.1, 0.2, 0.4]  # inf = a batch without any positive kept value (skipped)
    finite = [v for v in values if math.isfinite(v)]
    run = _sae(arch="batchtopk", threshold_mode="running_mean")
    ema = _sae(arch="batchtopk", threshold_mode="ema", threshold_decay=0.9)
    for v in values:
        run.observe_threshold(torch.tensor(v))
        ema.observe_threshold(torch.tensor(v))
    assert float(run.threshold) == pytest.approx(np.mean(finite), rel=1e-6)
    assert int(run.threshold_count) == 4
    expected = finite[0]
    for v in finite[1:]:
        expected = 0.9 * expected + 0.1 * v
    assert float(ema.threshold) == pytest.approx(expected, rel=1e-5)


# -- training losses ------------------------------------------------------------------------


def test_matryoshka_study_loss_matches_numpy():
    """Study preset: per-level independent BatchTopK, raw (un-ReLU'd) values, mean of level MSEs."""
    levels, level_k = [8, 16, 32], [2, 3, 5]
    sae = _sae(preset="study", levels=levels, level_k=level_k)
    x = sae.normalize(_x())
    out = sae.training_forward(x)
    p = _np(sae)
    xn = x.double().numpy()
    z = _np_pre(p, xn)
    mses, kept = [], None
    for width, k in zip(levels, level_k, strict=True):
        block = z[:, :width]
        mask = _np_batch_topk_mask(block, k * len(xn))
        codes = np.where(mask, block, 0.0)
        x_hat = codes @ p["W"][:width] + p["bd"]  # tied decoder
        mses.append(np.mean((x_hat - xn) ** 2))
        kept = block[mask]
    assert float(out.loss.detach()) == pytest.approx(np.mean(mses), rel=1e-5)
    assert float(out.min_kept) == pytest.approx(kept[kept > 0].min(), rel=1e-5)
    assert float(out.l0) == pytest.approx(level_k[-1], abs=1e-6)


def test_matryoshka_topk_levels_match_numpy():
    levels, level_k = [10, 20, 40], [2, 3, 4]
    sae = _sae(arch="matryoshka", matryoshka_inner="topk", levels=levels, level_k=level_k, auxk=False)
    x = sae.normalize(_x())
    out = sae.training_forward(x)
    p = _np(sae)
    xn = x.double().numpy()
    z = _np_pre(p, xn)
    mses = []
    for width, k in zip(levels, level_k, strict=True):
        block = z[:, :width]
        codes = np.where(_np_topk_mask(block, k), np.maximum(block, 0), 0)
        mses.append(np.mean((codes @ p["D"][:width] + p["bd"] - xn) ** 2))
    assert float(out.loss.detach()) == pytest.approx(np.mean(mses), rel=1e-5)


def test_auxk_loss_matches_numpy():
    sae = _sae(arch="topk", d_sae=40, k=4, k_aux=6, aux_coeff=0.25)
    x = sae.normalize(_x())
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.tensor([1, 5, 6, 9, 13, 20, 21, 30, 33, 39])] = True
    out = sae.training_forward(x, dead)
    p = _np(sae)
    xn = x.double().numpy()
    z = _np_pre(p, xn)
    codes = np.where(_np_topk_mask(z, 4), np.maximum(z, 0), 0)
    residual = xn - (codes @ p["D"] + p["bd"])
    cols = np.flatnonzero(dead.numpy())
    zd = z[:, cols]
    aux_codes = np.where(_np_topk_mask(zd, 6), np.maximum(zd, 0), 0)
    aux = np.mean((aux_codes @ p["D"][cols] - residual) ** 2)  # no decoder bias in the aux path
    mse = np.mean(residual**2)
    assert float(out.aux) == pytest.approx(aux, rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(mse + 0.25 * aux, rel=1e-5)


# -- gradients against plain dense autograd ---------------------------------------------------


def _dense_reference_loss(sae: SAE, x: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    """The same loss written with dense tensors and ordinary autograd (no custom backward)."""
    cfg = sae.cfg
    w = sae.W_enc
    dec = w.detach() if cfg.tied_detached else sae.decoder_weight
    z = (x - sae.b_dec) @ w.t() + sae.b_enc
    if cfg.inner == "relu":
        a = torch.relu(z)
        loss = ((a @ dec + sae.b_dec - x) ** 2).mean()
        return loss + cfg.l1_coeff * (a * dec.norm(dim=1)).sum(1).mean()
    mses, x_hat = [], None
    for width, k in zip(cfg.levels, cfg.level_k, strict=True):
        block = z[:, :width]
        if cfg.inner == "batchtopk":
            mask = torch.from_numpy(_np_batch_topk_mask(block.detach().numpy(), k * len(x)))
        else:
            mask = torch.from_numpy(_np_topk_mask(block.detach().numpy(), k))
        vals = torch.relu(block) if cfg.topk_relu else block
        x_hat = (vals * mask) @ dec[:width] + sae.b_dec
        mses.append(((x_hat - x) ** 2).mean())
    loss = torch.stack(mses).mean()
    if dead is not None and dead.any():
        cols = torch.nonzero(dead).squeeze(1)
        zd = z[:, cols]
        mask = torch.from_numpy(_np_topk_mask(zd.detach().numpy(), min(cfg.k_aux, len(cols))))
        e_hat = (torch.relu(zd) * mask) @ dec[cols]
        loss = loss + cfg.aux_coeff * ((e_hat - (x - x_hat).detach()) ** 2).mean()
    return loss


def _grads(sae: SAE, loss: torch.Tensor) -> dict[str, np.ndarray]:
    sae.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone().numpy() for n, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "spec",
    [
        dict(arch="topk", d_sae=40, k=4, k_aux=5),
        dict(arch="batchtopk", d_sae=40, k=3, tied=True),
        dict(preset="study", levels=[8, 16, 40], level_k=[2, 3, 5]),
        dict(arch="matryoshka", matryoshka_inner="topk", levels=[10, 40], level_k=[2, 4], auxk=False),
        dict(arch="relu_l1", d_sae=30, l1_coeff=0.01),
    ],
    ids=["topk_auxk", "batchtopk_tied", "study", "matryoshka_topk", "relu_l1"],
)
@pytest.mark.parametrize("decoder_impl", ["sparse", "dense"])
def test_gradients_match_dense_autograd(spec: dict, decoder_impl: str):
    sae = _sae(**spec)
    x = sae.normalize(_x())
    dead = None
    if sae.cfg.auxk:
        dead = torch.zeros(sae.d_sae, dtype=torch.bool)
        dead[::3] = True
    got = _grads(sae, sae.training_forward(x, dead, decoder_impl=decoder_impl).loss)
    ref = _grads(sae, _dense_reference_loss(sae, x, dead))
    assert got.keys() == ref.keys()
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-7, err_msg=name)


def test_study_tied_decoder_is_detached():
    """The study's decoder reads W_enc detached: W_enc's gradient comes from the encoder path only."""
    sae = _sae(preset="study", levels=[8, 40], level_k=[2, 5])
    x = sae.normalize(_x())
    got = _grads(sae, sae.training_forward(x).loss)["W_enc"]
    attached = _sae(preset="study", levels=[8, 40], level_k=[2, 5], tied_detached=False)
    full = _grads(attached, attached.training_forward(x).loss)["W_enc"]
    ref = _grads(sae, _dense_reference_loss(sae, x, None))["W_enc"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)
    assert np.abs(full - got).max() > 1e-3 * np.abs(got).max()


def test_unit_norm_projection_removes_parallel_component():
    sae = _sae(arch="topk", d_sae=40, k=4, auxk=False)
    x = sae.normalize(_x())
    sae.training_forward(x).loss.backward()
    g = sae.W_dec.grad.detach().double().numpy().copy()
    w = sae.W_dec.detach().double().numpy()
    sae.project_decoder_grad()
    expected = g - np.sum(g * w, axis=1, keepdims=True) * w
    np.testing.assert_allclose(sae.W_dec.grad.numpy(), expected, atol=1e-7)
    assert np.abs(np.sum(sae.W_dec.grad.numpy() * w, axis=1)).max() < 1e-6


# -- recipe -----------------------------------------------------------------------------------


def test_study_schedule_matches_formula():
    p = SAESpec(preset="study", levels=[16, 64], level_k=[5, 10])
    total = 5000
    warm = min(1000, total // 10)
    for step in (0, 1, 250, 499, 500, 501, 2750, 4999):
        if step < warm:
            expected = 1e-4 * (0.1 + 0.9 * step / warm)
        else:
            expected = 1e-6 + (1e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
        assert lr_at(step, total, p) == pytest.approx(expected, rel=1e-12)


def test_study_preset_fills_fields_and_explicit_values_win():
    spec = SAESpec(preset="study", levels=[16, 64, 256, 1024], level_k=[5, 5, 5, 5], epochs=3)
    for name, value in STUDY_PRESET.items():
        if name != "epochs":
            assert getattr(spec, name) == value, name
    assert spec.epochs == 3
    # a dumped spec validates to the same spec (the preset is idempotent)
    assert SAESpec.model_validate(spec.model_dump(mode="json")) == spec
    with pytest.raises(ValueError, match="exceeds level size"):
        SAESpec(preset="study", levels=[16, 64], level_k=[20, 20])

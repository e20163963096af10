"""``precision: bf16-mixed`` (the study preset's default) computes what the study's Lightning bf16-mixed does.

The reference is the study's training forward (``MatryoshkaSAE.forward`` in training mode, the
decoder reading ``encoder.weight.data``, the mean of the level MSEs) run under
``torch.autocast(bfloat16)`` with fp32 parameters and ordinary autograd, as Lightning runs it.
Batches are chosen without ties at any level's BatchTopK cut-off (bf16 has few distinct values;
tied entries may be broken either way by two correct implementations).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsae.sae.config import STUDY_PRESET, SAESpec
from medsae.sae.data import ArrayStore, TrainData
from medsae.sae.models import SAE, SAEConfig
from medsae.sae.train import TrainJob, train_many

D_IN, LEVELS, KS, BATCH = 32, [8, 32, 96], [1, 2, 3], 16


def _study_autocast(w, b_enc, b_dec, x):
    """Loss, largest-level reconstruction and pre-activations of the study's step under bf16 autocast."""
    n = w.shape[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = F.linear(x - b_dec, w, b_enc)
        recons = []
        for size, k in zip(LEVELS, KS, strict=True):
            flat = z[:, :size].reshape(-1)
            vals, idx = torch.topk(flat, k * x.shape[0])
            kept = torch.zeros_like(flat)
            kept[idx] = vals
            kept = kept.reshape(x.shape[0], size)
            if size < n:
                kept = torch.cat([kept, torch.zeros(x.shape[0], n - size)], dim=-1)
            recons.append(F.linear(kept, w.data.t()) + b_dec)
        loss = sum(F.mse_loss(r, x) for r in recons) / len(recons)
    return loss, recons[-1], z


def _setup(seed: int):
    gen = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig.from_spec(SAESpec(preset="study", levels=LEVELS, level_k=KS), D_IN), gen)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05, generator=gen)
        sae.b_dec.normal_(0, 0.05, generator=gen)
    x = F.normalize(torch.rand(BATCH, D_IN, generator=gen) + 0.2 * torch.randn(BATCH, D_IN, generator=gen), dim=1)
    return sae, x


def _is_bf16(t: torch.Tensor) -> bool:
    return bool(torch.equal(t, t.to(torch.bfloat16).float()))


@pytest.mark.parametrize("decoder_impl", ["sparse", "dense"])
def test_bf16_mixed_step_matches_the_study_under_autocast(decoder_impl: str):
    sae, x = _setup(seed=7)
    w, b_enc, b_dec = (torch.nn.Parameter(t.detach().clone()) for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    ref_loss, ref_hat, z = _study_autocast(w, b_enc, b_dec, x)
    for size, k in zip(LEVELS, KS, strict=True):  # precondition: no tie at any cut-off
        v = torch.sort(z[:, :size].float().reshape(-1), descending=True).values
        assert v[k * BATCH - 1] > v[k * BATCH]
    ref_loss.backward()

    out = sae.training_forward(x, None, torch.bfloat16, decoder_impl, torch.bfloat16)
    out.loss.backward()
    ulp = 2.0**-7  # one bf16 ulp is at most 2^-7 of the value
    assert torch.all((out.x_hat - ref_hat).abs() <= ulp * ref_hat.abs() + 1e-9)
    if decoder_impl == "dense":  # the same bf16 matmul: identical
        assert torch.equal(out.x_hat, ref_hat.detach().float())
        assert float(out.loss.detach()) == pytest.approx(float(ref_loss.detach()), 1e-7)
    # the encoder gradient: rounded to bf16 per level (autocast rounds the levels' sum once), so within 3 ulp
    for name, got, ref in (("W_enc", sae.W_enc.grad, w.grad), ("b_enc", sae.b_enc.grad, b_enc.grad)):
        assert torch.all((got - ref).abs() <= 3 * ulp * ref.abs() + 1e-9), name
    torch.testing.assert_close(sae.b_dec.grad, b_dec.grad, rtol=0, atol=1e-2 * float(b_dec.grad.abs().max()))
    one_level = SAE(SAEConfig(**{**sae.cfg.to_dict(), "levels": [96], "level_k": [3]}))
    one_level.load_state_dict(sae.state_dict())
    one_level.training_forward(x, None, torch.bfloat16, decoder_impl, torch.bfloat16).loss.backward()
    assert _is_bf16(one_level.W_enc.grad) and _is_bf16(one_level.b_enc.grad)  # one bf16 matmul's gradient

    # fp32 (medsae's default) is measurably another computation: its reconstruction is not the study's
    fp32 = SAE(sae.cfg)
    fp32.load_state_dict(sae.state_dict())
    plain = fp32.training_forward(x, None, torch.float32, decoder_impl, torch.float32)
    plain.loss.backward()
    assert float((plain.x_hat - ref_hat.detach()).abs().max()) > 1e-4
    assert not _is_bf16(fp32.W_enc.grad)


def test_study_preset_trains_bf16_mixed_and_keeps_r2():
    """The preset's default is the study's precision; training under it lands where fp32 does."""
    assert STUDY_PRESET["precision"] == "bf16-mixed" and SAESpec().precision == "auto"
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(64, D_IN))
    idx = np.argsort(rng.random((1024, 64)), axis=1)[:, :4]
    x = (np.einsum("nk,nkd->nd", rng.uniform(0.3, 1.5, (1024, 4)), atoms[idx]) + 0.5).astype(np.float32)
    base = dict(preset="study", levels=LEVELS, level_k=KS, batch_size=128, epochs=4, lr=3e-3, warmup_steps=5)
    r2, info = {}, {}
    for precision in ("fp32", "bf16-mixed"):
        spec = SAESpec(**base, **({} if precision == "bf16-mixed" else {"precision": precision}))
        data = TrainData(ArrayStore(x), np.arange(len(x)), torch.device("cpu"), 1e9)
        result = train_many([TrainJob(spec, seed=1)], data, torch.device("cpu"))[0]
        with torch.no_grad():
            xi = result.sae.normalize(torch.from_numpy(x)).double()
            x_hat = result.sae.decode(result.sae.encode(xi.float())).double()
        r2[precision] = 1 - float(((xi - x_hat) ** 2).sum() / ((xi - xi.mean()) ** 2).sum())
        info[precision] = result.info["precision"]
    assert info == {"fp32": "float32", "bf16-mixed": "bf16-mixed"}
    assert r2["fp32"] > 0.3
    print(f"R2 fp32 {r2['fp32']:.5f}, bf16-mixed {r2['bf16-mixed']:.5f}")
    assert abs(r2["bf16-mixed"] - r2["fp32"]) < 5e-3, r2

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
from planted import atom_sums  # sibling test module

from medsae.sae.config import STUDY_PRESET, SAESpec
from medsae.sae.data import ArrayStore, TrainData
from medsae.sae.models import SAE, SAEConfig
from medsae.sae.precision import bf16_support, cpu_bf16_flags, resolve_precision
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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_study_preset_is_bf16_mixed_only_where_the_hardware_has_bf16(tmp_path):
    """preset: study asks for bf16-mixed where the CPU/GPU has bf16 matmul units, fp32 (and why) elsewhere."""
    assert STUDY_PRESET["precision"] == "auto-bf16-mixed" and SAESpec().precision == "auto"
    (tmp_path / "sapphire").write_text("processor : 0\nflags : fpu sse2 avx512f amx_bf16 avx512_bf16\n")
    assert cpu_bf16_flags(str(tmp_path / "sapphire")) == ("avx512_bf16", "amx_bf16")
    (tmp_path / "zen2").write_text("processor : 0\nflags : fpu sse2 avx2\n")
    assert cpu_bf16_flags(str(tmp_path / "zen2")) == ()
    has_bf16 = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    cpu = torch.device("cpu")
    resolved = resolve_precision("auto-bf16-mixed", cpu)
    assert resolved.name == ("bf16-mixed" if has_bf16 else "float32")
    if not has_bf16:
        assert "no bf16 matmul units" in resolved.reason
    # explicit requests are honoured (emulated where needed); auto stays fp32 on a CPU
    assert resolve_precision("bf16-mixed", cpu).name == "bf16-mixed"
    assert resolve_precision("bf16", cpu).name == "bfloat16"
    assert resolve_precision("auto", cpu).name == "float32"
    spec = SAESpec(preset="study", levels=LEVELS, level_k=KS, batch_size=64, epochs=1, warmup_steps=1)
    x = np.random.default_rng(0).normal(size=(128, D_IN)).astype(np.float32)
    data = TrainData(ArrayStore(x), np.arange(len(x)), cpu, 1e9)
    info = train_many([TrainJob(spec)], data, cpu)[0].info
    assert (info["precision"], info["precision_requested"]) == (resolved.name, "auto-bf16-mixed")
    assert info["precision_reason"] == resolved.reason


@pytest.mark.parametrize("hip", [None, "6.2.41133"])
def test_cuda_bf16_is_native_from_compute_capability_8_of_the_device_asked_about(monkeypatch, hip):
    """No GPU needed: the device queries are stand-ins. A T4 (7.5) has only emulated bf16, an A100 (8.0)
    has it natively; the answer is the asked device's, not the current one's; ROCm GPUs have bf16; and
    torch.cuda.is_bf16_supported (whose ``including_emulation`` torch < 2.4 lacks) is not consulted."""
    gpus = {0: ("Tesla T4", (7, 5)), 1: ("NVIDIA A100-SXM4-80GB", (8, 0)), 2: ("NVIDIA H100", (9, 0))}
    current = 0  # torch.device("cuda") without an index: the current device

    def index(device) -> int:
        device = torch.device(device)
        assert device.type == "cuda"
        return current if device.index is None else device.index

    def no_is_bf16_supported(*args, **kwargs):
        raise TypeError("is_bf16_supported() got an unexpected keyword argument 'including_emulation'")

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpus[index(device)][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpus[index(device)][1])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_is_bf16_supported)
    monkeypatch.setattr(torch.version, "hip", hip)
    for i, (name, capability) in gpus.items():
        native = hip is not None or capability >= (8, 0)
        ok, why = bf16_support(torch.device("cuda", i))
        assert (ok, why) == (native, f"{name} has bf16" if native else f"{name} has no native bf16")
        study = resolve_precision("auto-bf16-mixed", torch.device("cuda", i))
        assert study.name == ("bf16-mixed" if native else "float32")
        assert resolve_precision("auto", torch.device("cuda", i)).name == ("bfloat16" if native else "float32")
    current = 1
    assert bf16_support(torch.device("cuda")) == (True, "NVIDIA A100-SXM4-80GB has bf16")
    current = 0
    t4 = (True, "Tesla T4 has bf16") if hip else (False, "Tesla T4 has no native bf16")
    assert bf16_support(torch.device("cuda")) == t4


def _planted(seed: int, n: int = 2048, d: int = 32) -> np.ndarray:
    """Each sample: 3 of 64 random unit atoms, coefficients in [0.5, 1.5], plus an offset of 0.3."""
    return atom_sums(n, d, atoms=64, offset=0.3, seed=seed, unit=True)


def test_bf16_training_keeps_r2_within_1e3_of_fp32():
    """Same planted data, same init: the final R² of bf16-mixed training (emulated on a CPU) is fp32's ± 1e-3."""
    x = _planted(seed=0, n=1024)
    base = dict(arch="topk", d_sae=64, k=3, batch_size=128, epochs=6, lr=3e-3, warmup_steps=5, normalize="none",
                dead_after=512, k_aux=8, log_every=10**6)  # fmt: skip
    r2, first_rows = {}, {}
    for precision in ("fp32", "bf16-mixed"):
        data = TrainData(ArrayStore(x), np.arange(len(x)), torch.device("cpu"), 1e9)
        result = train_many([TrainJob(SAESpec(**base, precision=precision), seed=1)], data, torch.device("cpu"))[0]
        assert result.info["precision"] == ("float32" if precision == "fp32" else "bf16-mixed")
        with torch.no_grad():  # R² computed here, independently of the trainer's statistics
            xi = torch.from_numpy(x).double()
            x_hat = result.sae.decode(result.sae.encode(xi.float())).double()
        r2[precision] = 1 - float(((xi - x_hat) ** 2).sum() / ((xi - xi.mean(0)) ** 2).sum())
        first_rows[precision] = result.history[0]["loss"]
    print(f"R2 fp32 {r2['fp32']:.5f}, bf16-mixed {r2['bf16-mixed']:.5f}")
    assert r2["fp32"] > 0.3
    assert first_rows["fp32"] != first_rows["bf16-mixed"]  # the two runs did compute differently
    assert abs(r2["bf16-mixed"] - r2["fp32"]) < 1e-3, r2

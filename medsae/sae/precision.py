"""Which matmul precision a training run uses, resolved against the hardware it runs on.

``sae.precision`` is a request:

* ``fp32`` / ``bf16`` (encoder matmul in bf16) / ``bf16-mixed`` (encoder and decoder matmuls in bf16,
  as the study's Lightning ``bf16-mixed``): honoured everywhere; on hardware without bf16 matmul
  units bf16 is emulated (same numbers, slower), which is what fidelity tests want.
* ``auto`` (the default): the bf16 encoder matmul on a GPU that has bf16, fp32 elsewhere.
* ``auto-bf16-mixed`` (``preset: study``): ``bf16-mixed`` where the hardware has bf16 matmul units
  (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX-BF16), fp32 elsewhere, because emulated bf16 is
  slower than fp32 and the study's own runs were on GPUs.

:func:`resolve_precision` returns the resolved precision with the reason, which the train stage
records in its log and summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

#: CPU flags (``/proc/cpuinfo``) of bf16 matmul units.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    """A resolved training precision: the encoder and decoder matmul dtypes and why."""

    encoder: torch.dtype
    decoder: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        """'float32', 'bfloat16' (encoder matmul only) or 'bf16-mixed' (what the train log records)."""
        if self.decoder != torch.float32:
            return "bf16-mixed"
        return str(self.encoder).replace("torch.", "")


@lru_cache(maxsize=1)
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The bf16 matmul flags this CPU reports (empty when none, or when /proc/cpuinfo is unreadable)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` has bf16 matmul units, and the evidence in a few words."""
    if device.type == "cuda":
        # native bf16: NVIDIA compute capability 8.0 (Ampere) and later, and every ROCm GPU torch runs on.
        # Not torch.cuda.is_bf16_supported: it checks the current device, not ``device``, counts emulation
        # unless told not to, and torch < 2.4 has no ``including_emulation`` argument.
        name = torch.cuda.get_device_name(device)
        if torch.version.hip or tuple(torch.cuda.get_device_capability(device)) >= (8, 0):
            return True, f"{name} has bf16"
        return False, f"{name} has no native bf16"
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return True, f"the CPU has {'/'.join(flags)}"
        return False, "the CPU has no bf16 matmul units (no avx512_bf16/amx_bf16 in /proc/cpuinfo)"
    return False, f"bf16 matmul support on {device.type} is not checked"


def resolve_precision(request: str, device: torch.device) -> Precision:
    """The precision a run with ``sae.precision = request`` uses on ``device`` (module docstring)."""
    bf16, f32 = torch.bfloat16, torch.float32
    if request == "fp32":
        return Precision(f32, f32, "requested")
    if request in ("bf16", "bf16-mixed"):
        ok, why = bf16_support(device)
        note = "requested" if ok else f"requested; emulated: {why}"
        return Precision(bf16, bf16 if request == "bf16-mixed" else f32, note)
    ok, why = bf16_support(device)
    if request == "auto":
        if device.type == "cuda" and ok:
            return Precision(bf16, f32, f"auto: {why}")
        return Precision(f32, f32, f"auto: fp32 on {device.type}" + ("" if device.type != "cuda" else f" ({why})"))
    if request == "auto-bf16-mixed":
        if ok:
            return Precision(bf16, bf16, f"auto-bf16-mixed: {why}")
        return Precision(f32, f32, f"auto-bf16-mixed: fp32 because {why} (emulated bf16 is slower than fp32)")
    raise ValueError(f"unknown precision {request!r}")

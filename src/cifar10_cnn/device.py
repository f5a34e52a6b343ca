"""Where training runs and in which precision: device choice, the CPU bf16 probe, the autocast policy."""

from __future__ import annotations

import torch

from .errors import UserError


def select_device(name: str = "auto") -> torch.device:
    """auto picks CUDA, then MPS, then CPU; an explicit choice that is not available is an error."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available; use --device auto or cpu")
    if name == "mps" and not has_mps:
        raise UserError("--device mps was asked for, but MPS is not available; use --device auto or cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX).

    Measured here (benchmarks/profile_step.py): with AVX512-BF16, bf16 autocast trains 1.8-2.2x faster than
    fp32; a CPU without it emulates bf16 and runs many times slower, so it stays in fp32.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training, None for fp32.

    auto: bf16 on CUDA where supported, else fp16; bf16 on a CPU with native bf16; fp32 otherwise (MPS, older
    CPUs). Weights, optimizer state and evaluation stay fp32 either way.
    """
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to dtype on the device's type; dtype None: off (fp32)."""
    return torch.autocast(device.type, dtype or torch.float32, enabled=dtype is not None)


def precision_name(dtype: torch.dtype | None) -> str:
    """bfloat16, float16 or float32: how the run header and results.json name the training precision."""
    return str(dtype or torch.float32).removeprefix("torch.")

"""One line naming the machine a benchmark ran on: CPU model, native bf16 or not, torch and its threads."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from cifar10_cnn.device import cpu_has_native_bf16


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> str:
    bf16 = "native bf16 (AVX512-BF16 or AMX)" if cpu_has_native_bf16() else "no native bf16 (fp32)"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"CPU {cpu_model()} ({os.cpu_count()} cores visible, {bf16}){gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

"""Seeding and device selection."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from pgpcl.errors import ConfigError


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this for deterministic matmuls; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA GPU is visible; use train.device=cpu")
    return device


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX); None where /proc/cpuinfo is unreadable."""
    try:
        for line in open(cpuinfo, encoding="utf-8"):
            if line.startswith("flags"):
                return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        return None
    return None


def bf16_cpu_warning(amp: str, device: torch.device) -> str | None:
    """A one-line warning for bf16 autocast on a CPU that emulates bf16 (measured ~19x slower a step
    on AVX2, BENCHMARKS.md section 6); None when there is nothing to say."""
    if amp != "bf16" or device.type != "cpu" or cpu_has_bf16() is not False:
        return None
    return ("pgpcl: warning: train.amp=bf16 on a CPU without AVX512-BF16 or AMX: bf16 is emulated there and "
            "a step is many times slower than fp32; use train.amp=none")

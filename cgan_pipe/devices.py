"""Turning a configured device ('auto' | 'cpu' | 'cuda') into a torch device."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(requested: str, key: str) -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu; 'cuda' without a GPU is a ConfigError naming `key`."""
    has_cuda = torch.cuda.is_available()
    if requested == "auto":
        return torch.device("cuda" if has_cuda else "cpu")
    if requested == "cuda" and not has_cuda:
        raise ConfigError(f"{key}: 'cuda' requested but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(requested)


def has_fast_bf16(device: torch.device) -> bool:
    """Whether `device` runs bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX
    (elsewhere bfloat16 is emulated on the CPU and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)

"""Turning a configured device ('auto' | 'cpu' | 'cuda') into a torch device, and what memory it has free."""

from __future__ import annotations

import os
from pathlib import Path

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


def available_memory(device: torch.device) -> int:
    """Bytes a new allocation on `device` can take: the GPU's free memory, or this machine's available memory
    (Linux's MemAvailable, lowered to what this process's cgroup still allows)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:  # not Linux: all of the memory
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit, used = (Path("/sys/fs/cgroup") / name for name in ("memory.max", "memory.current"))
        if limit.read_text().strip().isdigit():
            available = min(available, int(limit.read_text()) - int(used.read_text()))
    except (OSError, ValueError):
        pass
    return available


def gib(size: int) -> str:
    """A byte count in GiB, for messages."""
    return f"{size / 2**30:,.1f} GiB"

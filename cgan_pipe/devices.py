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

"""Exponential moving average of the generator's weights."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int, warmup: int = 10) -> None:
    """Move `ema`'s parameters towards `model`'s; buffers (BatchNorm statistics) are copied.

    The decay warms up as min(decay, (1 + step) / (warmup + step)) so early averages are not
    dominated by the random initialisation (warmup 0: the full decay from the first step). One
    multi-tensor kernel per group rather than one per parameter.
    """
    beta = min(decay, (1 + step) / (warmup + step)) if warmup else decay
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - beta)
    torch._foreach_copy_(list(ema.buffers()), list(model.buffers()))

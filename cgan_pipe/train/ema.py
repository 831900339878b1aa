"""Exponential moving average of the generator's weights."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int, warmup: int = 10) -> None:
    """Move `ema`'s parameters towards `model`'s; buffers (BatchNorm statistics) are copied.

    The decay warms up as min(decay, (1 + step) / (warmup + step)) so early averages are not
    dominated by the random initialisation (warmup 0: the full decay from the first step).
    """
    beta = min(decay, (1 + step) / (warmup + step)) if warmup else decay
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)

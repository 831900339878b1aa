"""Sizes shared by the network families."""

from __future__ import annotations

import math


def doublings_from_4x4(resolution: int) -> int:
    """How many times a 4x4 feature map doubles to reach `resolution` (a power of two >= 8)."""
    steps = int(math.log2(resolution)) - 2
    if steps < 1 or 4 * 2 ** steps != resolution:
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
    return steps

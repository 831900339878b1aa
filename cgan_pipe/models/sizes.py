"""Sizes shared by the network families: how many doublings, and how many channels at each resolution."""

from __future__ import annotations

import math


def doublings_from_4x4(resolution: int) -> int:
    """How many times a 4x4 feature map doubles to reach `resolution` (a power of two >= 8)."""
    steps = int(math.log2(resolution)) - 2
    if steps < 1 or 4 * 2 ** steps != resolution:
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
    return steps


# The resolution up to which each family keeps its full width; beyond it the channels halve with each
# doubling. DCGAN halves from the start (its G's transposed convs); the residual families hold the width to
# 32x32, where CIFAR-10 is trained, and narrow above it, as BigGAN's and StyleGAN's channel plans do: the
# cost of a layer grows with its map's area, so wide layers are kept where maps are small.
FULL_WIDTH_UP_TO = {"dcgan": 4, "resnet": 32, "r3gan": 32}
MIN_CHANNELS = 32


def channel_plan(arch: str, width: int, resolution: int) -> list[int]:
    """Channels of the feature maps at 4x4, 8x8, ... up to `resolution`: `width` up to the family's
    FULL_WIDTH_UP_TO, then halved at each doubling, never below MIN_CHANNELS. G runs the plan forwards,
    D backwards."""
    plan = [width]
    for doubling in range(1, doublings_from_4x4(resolution) + 1):
        size = 4 * 2 ** doubling
        plan.append(plan[-1] if size <= FULL_WIDTH_UP_TO[arch] else max(plan[-1] // 2, MIN_CHANNELS))
    return plan

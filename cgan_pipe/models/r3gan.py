"""R3GAN-style networks (Huang et al. 2024, "The GAN is dead; long live the GAN! A modern GAN baseline",
https://arxiv.org/abs/2501.05441), written from the paper's description.

No normalisation layer anywhere. Each stage is a resampling transition (bilinear, with a 1x1 conv where the
channels change) and residual blocks of ResNeXt shape: 1x1 conv widening by `EXPANSION`, a grouped 3x3 conv,
and a 1x1 conv back, whose weights start at zero, so every block starts as the identity; the other layers
start at He-normal scaled down with the number of blocks (the fix-up initialisation the paper uses). G
starts from a learned 4x4 basis scaled channel by channel by a linear map of (z, class embedding); D ends
with a 4x4 depthwise conv to one vector, judged by the projection head. G ends with tanh, so its images
are in [-1, 1] like the other families' (the paper's G output is linear).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .projection import ProjectionDiscriminator
from .quality import QualityEmbedding, check_quality_input, condition_embedding, jpeg_output
from .sizes import channel_plan

EXPANSION = 2  # hidden channels of a block, per channel
GROUP_CHANNELS = 16  # channels per group of the grouped 3x3 conv (the paper's CIFAR-10 model: 1536 / 96)
BLOCKS_PER_STAGE = 2
SLOPE = 0.2  # leaky ReLU
GAIN = math.sqrt(2 / (1 + SLOPE ** 2))


def _he(layer: nn.Module, gain: float) -> nn.Module:
    """Normal weights of std gain / sqrt(fan-in), zero bias."""
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(layer.weight[0].numel()))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class ResidualBlock(nn.Module):
    """x + conv1x1(lrelu(grouped conv3x3(lrelu(conv1x1(x))))), the last conv zero at the start."""

    def __init__(self, channels: int, total_blocks: int):
        super().__init__()
        hidden = channels * EXPANSION
        scale = total_blocks ** -0.25  # fix-up: L ** (-1 / (2m - 2)) for m = 3 layers per branch
        self.widen = _he(nn.Conv2d(channels, hidden, 1), GAIN * scale)
        groups = math.gcd(hidden, max(hidden // GROUP_CHANNELS, 1))  # a divisor of hidden, for any width
        self.mix = _he(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=groups), GAIN * scale)
        self.narrow = nn.Conv2d(hidden, channels, 1, bias=False)
        nn.init.zeros_(self.narrow.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output, at the size and channels of `x`."""
        h = F.leaky_relu(self.widen(x), SLOPE)
        h = F.leaky_relu(self.mix(h), SLOPE)
        return x + self.narrow(h)


def _stage(channels: int, total_blocks: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(channels, total_blocks) for _ in range(BLOCKS_PER_STAGE)))


class Generator(nn.Module):
    """G(z, y[, q]): a 4x4 basis scaled by linear(z, embed(y) [+ embed_quality(q)]), then per stage a bilinear
    2x upsampling (1x1 conv where the channels change) and residual blocks, a 1x1 conv to RGB and tanh [->
    differentiable JPEG at q, with `jpeg`]."""

    def __init__(self, z_dim: int, num_classes: int, resolution: int, channels: int = 3, width: int = 256,
                 embed_dim: int = 64, quality: bool = False, jpeg: bool = False):
        super().__init__()
        self.z_dim, self.num_classes, self.quality_conditioned = z_dim, num_classes, quality
        self.jpeg = jpeg and quality
        plan = channel_plan("r3gan", width, resolution)
        total_blocks = BLOCKS_PER_STAGE * len(plan)
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        self.embed_quality = QualityEmbedding(embed_dim) if quality else None
        in_dim = z_dim + (embed_dim if num_classes or quality else 0)
        self.basis = nn.Parameter(torch.randn(plan[0], 4, 4))
        self.scale = _he(nn.Linear(in_dim, plan[0], bias=False), 1.0)
        self.stages = nn.ModuleList([_stage(plan[0], total_blocks)])
        self.transitions = nn.ModuleList()
        for c_in, c_out in zip(plan[:-1], plan[1:]):
            self.transitions.append(_he(nn.Conv2d(c_in, c_out, 1), 1.0) if c_in != c_out else nn.Identity())
            self.stages.append(_stage(c_out, total_blocks))
        self.to_rgb = _he(nn.Conv2d(plan[-1], channels, 1), 1.0)

    def forward(self, z: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1], NCHW, for latents `z` (N, z_dim), class ids `labels` (N,) and, when
        quality-conditioned, JPEG qualities in [0, 1] (N,)."""
        check_quality_input(self, quality)
        condition = condition_embedding(self, labels, quality)
        x = torch.cat([z, condition], dim=1) if condition is not None else z
        h = self.basis[None] * self.scale(x)[:, :, None, None]
        h = self.stages[0](h)
        for transition, stage in zip(self.transitions, self.stages[1:]):
            h = stage(transition(F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)))
        images = torch.tanh(self.to_rgb(h))
        return jpeg_output(images, quality) if self.jpeg else images


class Discriminator(ProjectionDiscriminator):
    """D(x, y[, q]): a 1x1 conv from RGB, then per stage residual blocks and a 2x average-pool downsampling
    (1x1 conv where the channels change) down to 4x4, residual blocks there, a 4x4 depthwise conv to one
    vector f; logit = linear(f) + <embed(y), f> [+ <embed_quality(q), f>] (projection)."""

    def __init__(self, num_classes: int, resolution: int, channels: int = 3, width: int = 256,
                 quality: bool = False):
        super().__init__()
        self.quality_conditioned = quality
        plan = channel_plan("r3gan", width, resolution)[::-1]  # from the image's size down to 4x4
        total_blocks = BLOCKS_PER_STAGE * len(plan)
        self.from_rgb = _he(nn.Conv2d(channels, plan[0], 1), 1.0)
        self.stages = nn.ModuleList(_stage(c, total_blocks) for c in plan)
        self.transitions = nn.ModuleList(_he(nn.Conv2d(c_in, c_out, 1), 1.0) if c_in != c_out else nn.Identity()
                                         for c_in, c_out in zip(plan[:-1], plan[1:]))
        self.basis = _he(nn.Conv2d(plan[-1], plan[-1], 4, groups=plan[-1], bias=False), 1.0)
        self.build_head(plan[-1], num_classes, quality, spectral=False)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor | None = None,
                classes: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One realness logit per image, shape (N,); with `classes`, also each image's class logits (N, classes)."""
        check_quality_input(self, quality)
        h = self.from_rgb(images)
        for stage, transition in zip(self.stages, self.transitions):
            h = transition(F.avg_pool2d(stage(h), 2))
        f = self.basis(self.stages[-1](h)).flatten(1)
        return self.head(f, labels, quality, classes)

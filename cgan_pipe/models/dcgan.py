"""Class-conditional DCGAN: generator with a class embedding, projection discriminator."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import spectral_norm

from .projection import ProjectionDiscriminator
from .quality import QualityEmbedding, check_quality_input, jpeg_output
from .sizes import channel_plan


class Generator(nn.Module):
    """G(z, y[, q]): latent + class embedding [+ quality embedding] -> 4x4 map -> transposed-conv
    upsampling -> tanh image [-> differentiable JPEG at q, with `jpeg`]."""

    def __init__(self, z_dim: int, num_classes: int, resolution: int, channels: int = 3, width: int = 256,
                 quality: bool = False, jpeg: bool = False):
        super().__init__()
        self.z_dim, self.num_classes, self.quality_conditioned = z_dim, num_classes, quality
        self.jpeg = jpeg and quality
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        self.embed_quality = QualityEmbedding(z_dim) if quality else None
        in_dim = z_dim * (1 + bool(num_classes) + quality)
        self.stem = nn.Sequential(
            nn.Linear(in_dim, 4 * 4 * width, bias=False),
            nn.Unflatten(1, (width, 4, 4)),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        plan, blocks = channel_plan("dcgan", width, resolution), []
        for c_in, c_out in zip(plan[:-1], plan[1:]):
            blocks += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
        self.blocks = nn.Sequential(*blocks)
        self.to_rgb = nn.Sequential(nn.Conv2d(plan[-1], channels, 3, 1, 1), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1], NCHW, for latents `z` (N, z_dim), class ids `labels` (N,) and, when
        quality-conditioned, JPEG qualities in [0, 1] (N,)."""
        check_quality_input(self, quality)
        parts = [z] + ([self.embed(labels)] if self.embed is not None else [])
        parts += [self.embed_quality(quality)] if self.embed_quality is not None else []
        images = self.to_rgb(self.blocks(self.stem(torch.cat(parts, dim=1))))
        return jpeg_output(images, quality) if self.jpeg else images


class Discriminator(ProjectionDiscriminator):
    """D(x, y[, q]): spectral-normalised strided convs -> features; logit = linear(f) + <embed(y), f>
    [+ <embed_quality(q), f>].

    The class (and the quality) enter by projection (Miyato & Koyama, 2018): https://arxiv.org/abs/1802.05637
    """

    def __init__(self, num_classes: int, resolution: int, channels: int = 3, width: int = 256,
                 quality: bool = False):
        super().__init__()
        self.quality_conditioned = quality
        widths = channel_plan("dcgan", width, resolution)[::-1]  # from the image's size down to 4x4
        layers = [spectral_norm(nn.Conv2d(channels, widths[0], 3, 1, 1)), nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        feature_dim = widths[-1] * 4 * 4
        self.build_head(feature_dim, num_classes, quality)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor | None = None,
                classes: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One realness logit per image, shape (N,); with `classes`, also each image's class logits (N, classes)."""
        check_quality_input(self, quality)
        f = self.features(images)
        return self.head(f, labels, quality, classes)

"""Class-conditional ResNet GAN of the SNGAN/BigGAN family (Miyato et al. 2018; Brock et al. 2019).

G: residual up-blocks with class-conditional BatchNorm, whose gains and biases
come from one class embedding shared by all blocks. D: residual down-blocks,
spectral norm on every layer, global sum pooling, and a projection of the
class embedding onto the features (Miyato & Koyama 2018). Written from the papers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import spectral_norm

from .projection import ProjectionDiscriminator
from .quality import QualityEmbedding, check_quality_input, condition_embedding, jpeg_output
from .sizes import channel_plan


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine; gain (1 + g) and bias b per sample from the class embedding."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=embed_dim == 0)
        self.affine = nn.Linear(embed_dim, 2 * channels) if embed_dim else None
        if self.affine is not None:
            nn.init.zeros_(self.affine.weight)
            nn.init.zeros_(self.affine.bias)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        """Normalise `x`, then scale and shift it by its class (when conditional)."""
        h = self.norm(x)
        if self.affine is None:
            return h
        gain, bias = self.affine(embedding).chunk(2, dim=1)
        return h * (1 + gain[:, :, None, None]) + bias[:, :, None, None]


class GeneratorBlock(nn.Module):
    """CBN-ReLU-upsample-conv-CBN-ReLU-conv, plus an upsampled 1x1 conv skip."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int):
        super().__init__()
        self.norm1, self.norm2 = ConditionalBatchNorm(c_in, embed_dim), ConditionalBatchNorm(c_out, embed_dim)
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        """Double the spatial size of `x`."""
        h = F.interpolate(F.relu(self.norm1(x, embedding)), scale_factor=2)
        h = self.conv2(F.relu(self.norm2(self.conv1(h), embedding)))
        return h + self.skip(F.interpolate(x, scale_factor=2))


class Generator(nn.Module):
    """G(z, y[, q]): linear to a 4x4 map, residual up-blocks to the resolution, BN-ReLU-conv-tanh [->
    differentiable JPEG at q, with `jpeg`]. The class embedding (plus the quality embedding, when
    quality-conditioned) drives every block's CBN."""

    def __init__(self, z_dim: int, num_classes: int, resolution: int, channels: int = 3, width: int = 256,
                 embed_dim: int = 128, quality: bool = False, jpeg: bool = False):
        super().__init__()
        self.z_dim, self.width, self.quality_conditioned = z_dim, width, quality
        self.jpeg = jpeg and quality
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None  # shared by every block
        self.embed_quality = QualityEmbedding(embed_dim) if quality else None
        embed_dim = embed_dim if num_classes or quality else 0
        self.stem = nn.Linear(z_dim, 4 * 4 * width)
        plan = channel_plan("resnet", width, resolution)
        self.blocks = nn.ModuleList(GeneratorBlock(c_in, c_out, embed_dim) for c_in, c_out in zip(plan[:-1], plan[1:]))
        self.to_rgb = nn.Sequential(nn.BatchNorm2d(plan[-1]), nn.ReLU(), nn.Conv2d(plan[-1], channels, 3, 1, 1),
                                    nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor,
                quality: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1], NCHW, for latents `z` (N, z_dim), class ids `labels` (N,) and, when
        quality-conditioned, JPEG qualities in [0, 1] (N,)."""
        check_quality_input(self, quality)
        embedding = condition_embedding(self, labels, quality)
        h = self.stem(z).view(z.shape[0], self.width, 4, 4)
        for block in self.blocks:
            h = block(h, embedding)
        images = self.to_rgb(h)
        return jpeg_output(images, quality) if self.jpeg else images


class DiscriminatorBlock(nn.Module):
    """[ReLU]-conv-ReLU-conv-[avgpool], plus a 1x1 conv (and avgpool) skip; spectral norm throughout.
    The first block of D starts with the conv, not a ReLU, as the image is not a feature map."""

    def __init__(self, c_in: int, c_out: int, downsample: bool, first: bool = False):
        super().__init__()
        self.conv1 = spectral_norm(nn.Conv2d(c_in, c_out, 3, 1, 1))
        self.conv2 = spectral_norm(nn.Conv2d(c_out, c_out, 3, 1, 1))
        self.skip = spectral_norm(nn.Conv2d(c_in, c_out, 1))
        self.downsample, self.first = downsample, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of `x`, at half the size when downsampling."""
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        skip = x
        if self.first:  # pool before the 1x1 conv on the image, after it on features (as in SNGAN)
            skip = self.skip(F.avg_pool2d(skip, 2)) if self.downsample else self.skip(skip)
        else:
            skip = self.skip(skip)
            skip = F.avg_pool2d(skip, 2) if self.downsample else skip
        return (F.avg_pool2d(h, 2) if self.downsample else h) + skip


class Discriminator(ProjectionDiscriminator):
    """D(x, y[, q]): residual down-blocks to 4x4, one more block, ReLU, sum over space; logit =
    linear(f) + <embed(y), f> [+ <embed_quality(q), f>] (projection)."""

    def __init__(self, num_classes: int, resolution: int, channels: int = 3, width: int = 256,
                 quality: bool = False):
        super().__init__()
        self.quality_conditioned = quality
        # block k takes the features at resolution / 2**k to resolution / 2**(k+1), with the plan's channels there
        outs = channel_plan("resnet", width, resolution)[-2::-1]
        ins = [channels] + outs[:-1]
        blocks = [DiscriminatorBlock(c_in, c_out, downsample=True, first=k == 0)
                  for k, (c_in, c_out) in enumerate(zip(ins, outs))]
        blocks += [DiscriminatorBlock(width, width, downsample=False)]
        self.blocks = nn.Sequential(*blocks)
        self.build_head(width, num_classes, quality)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor | None = None,
                classes: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One realness logit per image, shape (N,); with `classes`, also each image's class logits (N, classes)."""
        check_quality_input(self, quality)
        f = F.relu(self.blocks(images)).sum(dim=(2, 3))
        return self.head(f, labels, quality, classes)

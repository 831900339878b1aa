"""Class-conditional DCGAN: generator with a class embedding, projection discriminator."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import spectral_norm

from .sizes import doublings_from_4x4


class Generator(nn.Module):
    """G(z, y): latent + class embedding -> 4x4 map -> transposed-conv upsampling -> tanh image."""

    def __init__(self, z_dim: int, num_classes: int, resolution: int, channels: int = 3, width: int = 256):
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        in_dim = z_dim * (2 if num_classes else 1)
        self.stem = nn.Sequential(
            nn.Linear(in_dim, 4 * 4 * width, bias=False),
            nn.Unflatten(1, (width, 4, 4)),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        blocks, c = [], width
        for _ in range(doublings_from_4x4(resolution)):
            out = max(c // 2, 32)
            blocks += [nn.ConvTranspose2d(c, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.blocks = nn.Sequential(*blocks)
        self.to_rgb = nn.Sequential(nn.Conv2d(c, channels, 3, 1, 1), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], NCHW, for latents `z` (N, z_dim) and class ids `labels` (N,)."""
        h = torch.cat([z, self.embed(labels)], dim=1) if self.embed is not None else z
        return self.to_rgb(self.blocks(self.stem(h)))


class Discriminator(nn.Module):
    """D(x, y): spectral-normalised strided convs -> features; logit = linear(f) + <embed(y), f>.

    The class enters by projection (Miyato & Koyama, 2018): https://arxiv.org/abs/1802.05637
    """

    def __init__(self, num_classes: int, resolution: int, channels: int = 3, width: int = 256):
        super().__init__()
        steps = doublings_from_4x4(resolution)
        widths = [max(width // 2 ** (steps - i), 32) for i in range(steps + 1)]  # ends at `width`
        layers = [spectral_norm(nn.Conv2d(channels, widths[0], 3, 1, 1)), nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        feature_dim = widths[-1] * 4 * 4
        self.linear = spectral_norm(nn.Linear(feature_dim, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, feature_dim)) if num_classes else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One realness logit per image, shape (N,)."""
        f = self.features(images)
        logit = self.linear(f).squeeze(1)
        if self.embed is not None:
            logit = logit + (self.embed(labels) * f).sum(dim=1)
        return logit

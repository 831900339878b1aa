"""The JPEG quality as a network input: a learned embedding of q in [0, 1], used next to the class."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import spectral_norm

from ..compression import simulate_jpeg

FREQUENCIES = 4  # sin/cos of q at pi, 2pi, 4pi, 8pi: q = 0.30 and 0.35 differ clearly to the MLP


class QualityEmbedding(nn.Module):
    """q (N,) in [0, 1] -> (N, dim): q and its Fourier features through a two-layer MLP
    (spectral-normalised for a discriminator)."""

    def __init__(self, dim: int, hidden: int = 128, spectral: bool = False):
        super().__init__()
        wrap = spectral_norm if spectral else (lambda layer: layer)
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(FREQUENCIES), persistent=False)
        self.net = nn.Sequential(wrap(nn.Linear(1 + 2 * FREQUENCIES, hidden)), nn.SiLU(), wrap(nn.Linear(hidden, dim)))

    def forward(self, quality: torch.Tensor) -> torch.Tensor:
        """The embedding of each quality."""
        q = quality.to(self.frequencies.dtype)[:, None]
        angles = q * self.frequencies
        return self.net(torch.cat([q, angles.sin(), angles.cos()], dim=1))


def condition_embedding(module: nn.Module, labels: torch.Tensor, quality: torch.Tensor | None
                        ) -> torch.Tensor | None:
    """What a generator is conditioned on: its class embedding of `labels` (`module.embed`) plus, when
    quality-conditioned, its embedding of `quality` (`module.embed_quality`); None when it has neither."""
    embedding = module.embed(labels) if module.embed is not None else None
    if module.embed_quality is not None:
        q = module.embed_quality(quality)
        embedding = q if embedding is None else embedding + q
    return embedding


def jpeg_output(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """A generator's images JPEG-compressed (differentiably) at its requested qualities in [0, 1]."""
    return simulate_jpeg(images, quality * 100)


def check_quality_input(module: nn.Module, quality: torch.Tensor | None) -> None:
    """Raise ValueError when a network conditioned on quality gets none, or an unconditioned one gets some."""
    if module.quality_conditioned and quality is None:
        raise ValueError(f"{type(module).__name__} is conditioned on JPEG quality: pass one per image")
    if not module.quality_conditioned and quality is not None:
        raise ValueError(f"{type(module).__name__} was built without quality conditioning: pass no quality")

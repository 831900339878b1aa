"""The head both discriminators share: a realness logit from features by projection (Miyato & Koyama 2018)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import spectral_norm

from .quality import QualityEmbedding


class ProjectionDiscriminator(nn.Module):
    """A discriminator whose logit is linear(f) + <embed(y), f> [+ <embed_quality(q), f>] for features f
    (https://arxiv.org/abs/1802.05637): subclasses compute f and call `build_head` once, after their own
    layers, then `head` in forward."""

    def build_head(self, feature_dim: int, num_classes: int, quality: bool, spectral: bool = True) -> None:
        """Create the linear, class and quality embeddings (none for 0 classes / no quality), spectral-normalised
        unless `spectral` is False (a discriminator without normalisation, kept in bounds by R1/R2)."""
        wrap = spectral_norm if spectral else (lambda layer: layer)
        self.linear = wrap(nn.Linear(feature_dim, 1))
        self.embed = wrap(nn.Embedding(num_classes, feature_dim)) if num_classes else None
        self.embed_quality = QualityEmbedding(feature_dim, spectral=spectral) if quality else None

    def head(self, f: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor | None,
             classes: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One realness logit per row of the features `f` (N, feature_dim), shape (N,). With `classes`, also
        the class logits <embed(c), f> of every class c, shape (N, num_classes): the same embedding judging
        class membership (dual projection, Han et al. 2021, https://arxiv.org/abs/2108.09016)."""
        logit = self.linear(f).squeeze(1)
        if self.embed is not None:
            logit = logit + (self.embed(labels) * f).sum(dim=1)
        if self.embed_quality is not None:
            logit = logit + (self.embed_quality(quality) * f).sum(dim=1)
        if classes:
            return logit, f @ self.embed.weight.t()  # the (spectral-normalised) weight embed(labels) just used
        return logit

"""GAN losses on raw discriminator logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """D's loss: 'hinge' (Lim & Ye 2017) or 'nonsaturating' (Goodfellow et al. 2014, logistic)."""
    return fake_loss(kind, -real_logits) + fake_loss(kind, fake_logits)  # judged real: the negated logit judged fake


def fake_loss(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """D's loss on logits it should judge fake: the second half of `discriminator_loss`, and of the first
    with the logits negated."""
    if kind == "hinge":
        return F.relu(1.0 + logits).mean()
    if kind == "nonsaturating":
        return F.softplus(logits).mean()
    raise ValueError(f"unknown loss {kind!r}")


def generator_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """G's loss for the same two kinds."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "nonsaturating":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"unknown loss {kind!r}")

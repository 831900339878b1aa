"""GAN losses on raw discriminator logits, and the R1 penalty on D's gradient at real images."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """D's loss: 'hinge' (Lim & Ye 2017) or 'nonsaturating' (Goodfellow et al. 2014, logistic)."""
    return fake_loss(kind, -real_logits) + fake_loss(kind, fake_logits)  # judged real: the negated logit judged fake


def fake_loss(kind: str, logits: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """D's loss on logits it should judge fake: the second half of `discriminator_loss`, and of the first
    with the logits negated. With `keep` (a bool per logit), the mean over the kept logits only (0 when
    none is), without the host read that selecting them would take."""
    if kind == "hinge":
        losses = F.relu(1.0 + logits)
    elif kind == "nonsaturating":
        losses = F.softplus(logits)
    else:
        raise ValueError(f"unknown loss {kind!r}")
    if keep is None:
        return losses.mean()
    return (losses * keep).sum() / keep.sum().clamp(min=1)


def generator_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """G's loss for the same two kinds."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "nonsaturating":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"unknown loss {kind!r}")


def r1_penalty(D: torch.nn.Module, reals: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor | None,
               autocast: Callable[[], contextlib.AbstractContextManager], gamma: float,
               every: int) -> torch.Tensor:
    """R1 (Mescheder et al. 2018, https://arxiv.org/abs/1801.04406): gamma / 2 * E ||grad_x D(x)||^2 over the
    real images `reals` (as D sees them, augmented), times `every` when applied every `every` steps (lazy
    regularisation, StyleGAN2).

    `D` must be the module itself, not its torch.compile wrapper: compiled graphs have no double backward
    ("torch.compile with aot_autograd does not currently support double backward"). The gradient of the
    logits' sum is taken unscaled, whatever loss scaling the D step uses: each logit's gradient is then 1,
    where a GradScaler's 2**16 would overflow float16 (max 65504) and make the penalty inf at its first step.
    The penalty itself is scaled like any loss when it is backpropagated.
    """
    seen = reals.detach().requires_grad_(True)
    with autocast():
        logits = D(seen, labels, quality)
    (grad,) = torch.autograd.grad(logits.float().sum(), seen, create_graph=True)
    return grad.float().square().sum(dim=(1, 2, 3)).mean() * (gamma / 2) * every

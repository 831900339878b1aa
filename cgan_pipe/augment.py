"""Differentiable GAN augmentation on the training device: DiffAugment (Zhao et al., NeurIPS 2020).

Every image D sees, real or fake, goes through the same random transforms, so D
cannot tell the two apart by the augmentation, and gradients flow through them
to G. Written here from the paper's description: colour, translation, cutout.
"""

from __future__ import annotations

from typing import Callable

import torch

POLICIES = ("color", "translation", "cutout")


def parse_policy(text: str) -> tuple[str, ...]:
    """The transforms named in a comma-separated policy ('' for none); ValueError for unknown names."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment transform {unknown[0]!r} (choose from {', '.join(POLICIES)})")
    return names


def diff_augment(images: torch.Tensor, policy: tuple[str, ...], p: float = 1.0) -> torch.Tensor:
    """Apply the transforms of `policy`, in order, each with fresh randomness per image, to NCHW
    images in [-1, 1]; differentiable in `images`. With p < 1 each transform is applied to each image
    with probability p, drawn per image and transform (ADA's augmentation probability)."""
    if p <= 0:
        return images
    for name in policy:
        changed = _TRANSFORMS[name](images)
        if p < 1:
            applied = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < p
            changed = torch.where(applied, changed, images)
        images = changed
    return images


def _color(x: torch.Tensor) -> torch.Tensor:
    """Random brightness (shift in [-0.5, 0.5]), saturation (x0..2) and contrast (x0.5..1.5)."""
    def factor() -> torch.Tensor:
        return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)

    x = x + (factor() - 0.5)
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * (factor() * 2) + grey
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (factor() + 0.5) + mean


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to `ratio` of its size in x and y, filling with zeros."""
    n, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (n, 1, 1), device=x.device)
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy + 1).clamp(0, h + 1)  # +1: the zero border
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx + 1).clamp(0, w + 1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # N, H+2, W+2, C
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[batch, rows, cols].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero a square of `ratio` of the image size at a random place (clipped at the borders)."""
    n, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + (1 - size_h % 2), (n, 1, 1), device=x.device) - size_h // 2
    left = torch.randint(0, w + (1 - size_w % 2), (n, 1, 1), device=x.device) - size_w // 2
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (ys >= top) & (ys < top + size_h) & (xs >= left) & (xs < left + size_w)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "color": _color, "translation": _translation, "cutout": _cutout,
}

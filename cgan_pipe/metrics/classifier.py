"""An image classifier trained on the real shards: a feature space that needs no download."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..config import LoaderConfig
from ..data.loader import first_samples
from ..devices import has_fast_bf16
from ..images import from_uint8, to_uint8

INPUT_SIZE = 32  # every image is resized to 32x32 before the classifier sees it
MAX_TRAINING_IMAGES = 100_000  # held in memory as 32x32 bytes: 300 MB at most
NAME = "classifier2"  # names its cache files: a new network gets a new name
BATCH_SIZE = 256


class _Block(nn.Module):
    """3x3 conv -> 2x2 max pool -> BatchNorm -> GELU -> 3x3 conv -> BatchNorm -> GELU."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class Classifier(nn.Module):
    """A fixed whitening layer over 2x2 patches, three conv blocks (64, 256, 256 channels, each halving
    the size), global max pool, linear.

    `features(x)` is the 256-d pooled vector used for the Frechet distance; `forward(x)` gives class
    logits. Inputs are images in [-1, 1] at any resolution.
    """

    FEATURES = 256

    def __init__(self, num_classes: int):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2)
        self.whiten.weight.requires_grad_(False)
        widths = (24, 64, 256, self.FEATURES)
        self.body = nn.Sequential(*[_Block(a, b) for a, b in zip(widths, widths[1:])])
        self.head = nn.Linear(self.FEATURES, num_classes, bias=False)
        self.to(memory_format=torch.channels_last)  # faster convolutions on CPUs and recent GPUs

    @torch.no_grad()
    def fit_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from the covariance of the 2x2 patches of `images` (each
        eigenvector scaled by 1/sqrt(its eigenvalue), and its negative)."""
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
        patches = (patches - patches.mean(0)).double()
        values, vectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (vectors.T / torch.sqrt(values + eps)[:, None]).reshape(12, 3, 2, 2).float()
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled 256-d features of a batch of images."""
        images = _at_input_size(images).contiguous(memory_format=torch.channels_last)
        return self.body(self.whiten(images)).amax(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _at_input_size(images: torch.Tensor) -> torch.Tensor:
    """Images resized (antialiased) to INPUT_SIZE x INPUT_SIZE, or as they are when already that size."""
    if images.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
        return images
    return F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)


def real_images(shards: Path | str, loader_cfg: LoaderConfig, device: torch.device,
                limit: int = MAX_TRAINING_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `limit` real images of the shard set (the first of its seeded stream, one pass at most) as
    32x32 bytes on `device`, and their labels."""
    images, labels = [], []
    for batch in first_samples(shards, loader_cfg, limit, device):
        images.append(to_uint8(_at_input_size(batch.images.float())))
        labels.append(batch.labels)
    return torch.cat(images), torch.cat(labels)


def _augment(images: torch.Tensor) -> torch.Tensor:
    """Bytes -> [-1, 1], a random 4-pixel shift (reflected border) and a random horizontal flip per image."""
    x = F.pad(from_uint8(images), (4, 4, 4, 4), mode="reflect")
    n = x.shape[0]
    rows = torch.randint(0, 9, (n,), device=x.device)[:, None] + torch.arange(INPUT_SIZE, device=x.device)
    cols = torch.randint(0, 9, (n,), device=x.device)[:, None] + torch.arange(INPUT_SIZE, device=x.device)
    flip = torch.rand(n, device=x.device) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(3, device=x.device)[None, :, None, None]
    return x[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def train_classifier(shards: Path | str, loader_cfg: LoaderConfig, num_classes: int, steps: int,
                     device: torch.device, progress: bool = False) -> Classifier:
    """Train a Classifier on the real shards for `steps` batches of 256 (random shifts and flips, label
    smoothing, SGD with a one-cycle learning rate, bf16 where the device runs it natively); seeded, and
    without touching the caller's random state."""
    images, labels = real_images(shards, loader_cfg, device)
    autocast = (torch.autocast(device.type, torch.bfloat16) if has_fast_bf16(device)
                else contextlib.nullcontext())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = Classifier(num_classes).to(device)
        model.fit_whitening(from_uint8(images[torch.randperm(len(images), device=device)[:5000]]))
        model.train()
        weights = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
        others = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
        optimizer = torch.optim.SGD([{"params": weights, "weight_decay": 5e-4}, {"params": others}],
                                    lr=0.2, momentum=0.9, nesterov=True)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=steps, pct_start=0.25)
        order, position = torch.randperm(len(images), device=device), 0
        batch_size = min(BATCH_SIZE, len(images))
        bar = tqdm(range(steps), desc="classifier", unit="step", disable=not progress, leave=False)
        for step in bar:
            if position + batch_size > len(images):
                order, position = torch.randperm(len(images), device=device), 0
            picked = order[position:position + batch_size]
            position += batch_size
            batch = _augment(images[picked])
            with autocast:
                loss = F.cross_entropy(model(batch), labels[picked], label_smoothing=0.2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if progress and step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()

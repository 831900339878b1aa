"""A small image classifier trained on the real shards: a feature space that needs no download."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..config import LoaderConfig
from ..data.loader import open_loader

INPUT_SIZE = 32  # every image is resized to 32x32 before the classifier sees it


class Classifier(nn.Module):
    """Three conv stages (32-64-128 channels, BatchNorm, max-pool) -> global average pool -> linear.

    `features(x)` is the 128-d pooled vector used for the Frechet distance; `forward(x)` gives class
    logits. Inputs are images in [-1, 1] at any resolution.
    """

    FEATURES = 128

    def __init__(self, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in (32, 64, 128):
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(self.FEATURES, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled 128-d features of a batch of images."""
        if images.shape[-1] != INPUT_SIZE or images.shape[-2] != INPUT_SIZE:
            images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                                   align_corners=False)
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(shards: Path | str, loader_cfg: LoaderConfig, num_classes: int, steps: int,
                     device: torch.device, batch_size: int = 128, progress: bool = False) -> Classifier:
    """Train a Classifier on the real shards for `steps` batches (flips and 4-pixel shifts, SGD with a
    one-cycle learning rate); seeded, and without touching the caller's random state."""
    augmented = dataclasses.replace(loader_cfg, hflip=True, pad_crop=4, resized_crop_min_scale=None,
                                    color_jitter=0.0)
    loader = open_loader(shards, augmented, batch_size, seed=0, device=device, whole=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Classifier(num_classes).to(device).to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps)
        batches = iter(loader)
        bar = tqdm(range(steps), desc="classifier", unit="step", disable=not progress, leave=False)
        for _ in bar:
            batch = next(batches)
            loss = F.cross_entropy(model(batch.images.contiguous(memory_format=torch.channels_last)), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    del loader
    return model.to(memory_format=torch.contiguous_format).eval()

"""JPEG quality estimation: from a JPEG file's quantisation tables, and from decoded pixels with a small
regressor trained on re-compressed real images; and the blockiness of decoded pixels."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from tqdm import tqdm

from ..compression import estimate_jpeg_quality, trained_qualities
from ..config import LoaderConfig
from ..data.loader import open_loader
from ..data.manifest import shard_set_manifest
from ..images import from_uint8, to_uint8

MIN_TRAINING_QUALITY = 5  # the regressor learns qualities MIN_TRAINING_QUALITY..100


def file_quality(data: bytes) -> int | None:
    """The libjpeg quality (1-100) a JPEG file was written at, read from its quantisation tables;
    None for a file that is not a JPEG or has no standard-like luminance table."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                return None
            return estimate_jpeg_quality(getattr(image, "quantization", None))
    except (OSError, ValueError):
        return None


class QualityRegressor(nn.Module):
    """Pixels -> JPEG quality: two 3x3 convs over pixels, an 8x8 stride-8 conv over the JPEG block
    grid (each with BatchNorm), a 1x1 conv, mean over blocks, linear, sigmoid (quality / 100).
    Inputs: images in [-1, 1] whose side is a multiple of 8, block grid at the origin (as JPEG puts it)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 8, stride=8), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 1), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(2 * width, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Estimated quality / 100 of each image, shape (N,)."""
        return torch.sigmoid(self.head(self.body(images).mean(dim=(2, 3))).squeeze(1))


@torch.no_grad()
def estimate_pixel_quality(model: QualityRegressor, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """Estimated JPEG quality (1-100, float) of each image in [-1, 1], NCHW."""
    parts = [model(images[i:i + batch_size]).mul(100).clamp(1, 100).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(parts).numpy()


def recompress(images: torch.Tensor, qualities: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] rounded to 8 bits, each JPEG-encoded with libjpeg at its quality and decoded."""
    pixels = to_uint8(images).cpu()
    coded = [decode_jpeg(encode_jpeg(p, quality=int(q)), mode=ImageReadMode.RGB) for p, q in zip(pixels, qualities)]
    return from_uint8(torch.stack(coded).to(images.device))


def train_quality_regressor(shards: Path | str, loader_cfg: LoaderConfig, steps: int, device: torch.device,
                            batch_size: int = 128, progress: bool = False) -> QualityRegressor:
    """Train a QualityRegressor on the real shards for `steps` batches: each image re-compressed at a
    random quality in MIN_TRAINING_QUALITY..100, L1 loss on quality / 100, Adam with a cosine schedule;
    seeded, and without touching the caller's random state. Shards that record several qualities
    contribute only their samples at the highest one (the cleanest)."""
    manifest = shard_set_manifest(shards)
    # flips keep the 8x8 grid where JPEG put it; shifts and crops would move it
    plain = dataclasses.replace(loader_cfg, hflip=True, pad_crop=0, resized_crop_min_scale=None, color_jitter=0.0,
                                jpeg_distort=None)
    recorded = trained_qualities(manifest, plain)
    several = len(recorded) > 1 and len(recorded) == len(manifest.quality_histogram)
    loader = open_loader(shards, plain, batch_size, seed=1, device=device, whole=True, with_quality=several)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = QualityRegressor().to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        batches = iter(loader)
        bar = tqdm(range(steps), desc="quality regressor", unit="step", disable=not progress, leave=False)
        for _ in bar:
            images = _clean_images(batches, batch_size, recorded[-1] / 100 if several else None)
            qualities = torch.randint(MIN_TRAINING_QUALITY, 101, (len(images),))
            loss = F.l1_loss(model(recompress(images, qualities)), qualities.to(device).float().div(100))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(mae=f"{loss.item() * 100:.2f}")
    del loader
    return model.eval()


def _clean_images(batches, batch_size: int, top_quality: float | None) -> torch.Tensor:
    """The next `batch_size` images from `batches`; only those at `top_quality` when it is given."""
    kept, count = [], 0
    while count < batch_size:
        batch = next(batches)
        images = batch.images if top_quality is None else batch.images[(batch.quality - top_quality).abs() < 1e-3]
        kept.append(images)
        count += len(images)
    return torch.cat(kept)[:batch_size]


def block_steps(images: torch.Tensor) -> np.ndarray:
    """Per image (NCHW), the mean absolute step between neighbouring pixels across the 8x8 JPEG block
    edges and inside the blocks, rows and columns together: shape (N, 2)."""
    across = torch.cat([(images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=(1, 2)),
                        (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(1, 3))], dim=1)
    edges = torch.cat([torch.arange(1, images.shape[-1]), torch.arange(1, images.shape[-2])]) % 8 == 0
    return torch.stack([across[:, edges].mean(1), across[:, ~edges].mean(1)], dim=1).float().cpu().numpy()


def block_edge_ratio(steps: np.ndarray) -> float:
    """Blockiness of a set of images from their `block_steps`: the mean step across block edges over
    the mean step inside blocks (1.0: no block structure; CIFAR-10 at q10: about 1.9)."""
    return float(steps[:, 0].mean() / steps[:, 1].mean())


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two equal-length sequences (ties get their average rank)."""
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2)[inverse.reshape(-1)]

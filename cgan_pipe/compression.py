"""JPEG compression helpers: the standard quantisation tables, quality estimation, differentiable JPEG."""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

MISMATCH_MARGIN = 10  # quality points: closer levels leave artefacts too alike to call one pairing wrong

if TYPE_CHECKING:
    from .config import LoaderConfig
    from .data.manifest import Manifest

# ITU-T T.81 Annex K, table K.1 (luminance), in natural (row-major) order.
STD_LUMINANCE_TABLE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
], dtype=np.int64)


def scaled_table(base: np.ndarray, quality: int) -> np.ndarray:
    """The quantisation table libjpeg derives from `base` at `quality` (1-100), baseline-clamped."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((base * scale + 50) // 100, 1, 255)


_LUMA_TABLES = np.stack([scaled_table(STD_LUMINANCE_TABLE, q) for q in range(1, 101)])


def estimate_jpeg_quality(quantization: dict[int, list[int]] | None) -> int | None:
    """Estimate the libjpeg quality (1-100) that produced a JPEG's quantisation tables.

    `quantization` is Pillow's `Image.quantization` (table id -> 64 values in natural
    order). Returns the quality whose scaled standard luminance table is closest, or
    None when the file has no usable luminance table.
    """
    if not quantization or 0 not in quantization or len(quantization[0]) != 64:
        return None
    return _closest_quality(tuple(quantization[0]))


@functools.lru_cache(maxsize=1024)  # an archive's files mostly share a few tables
def estimate_jpeg_quality_zigzag(luma_table: bytes | None) -> int | None:
    """`estimate_jpeg_quality` for a luminance table as stored in the file (zigzag order, 64 bytes)."""
    if luma_table is None or len(luma_table) != 64:
        return None
    natural = [0] * 64
    for k, value in enumerate(luma_table):
        natural[_ZIGZAG[k]] = value
    return _closest_quality(tuple(natural))


def _zigzag_order() -> list[int]:
    """Natural (row-major) position of each zigzag coefficient of an 8x8 block (T.81 figure 5)."""
    cells = sorted(((r, c) for r in range(8) for c in range(8)),
                   key=lambda rc: (rc[0] + rc[1], rc[0] if (rc[0] + rc[1]) % 2 else rc[1]))
    return [r * 8 + c for r, c in cells]


_ZIGZAG = _zigzag_order()


@functools.lru_cache(maxsize=1024)  # an archive's files mostly share a few tables
def _closest_quality(luma: tuple[int, ...]) -> int:
    errors = np.abs(_LUMA_TABLES - np.asarray(luma, dtype=np.int64)).sum(axis=1)
    return int(errors.argmin()) + 1


def simulate_jpeg(images: torch.Tensor, quality: torch.Tensor | float,
                  rounding: Literal["smooth", "straight_through"] = "smooth") -> torch.Tensor:
    """JPEG-compress and decompress NCHW RGB images in [-1, 1], differentiably, at `quality` (1-100;
    one number, or one per image); returns images in [-1, 1].

    kornia's `jpeg_codec_differentiable` (Reich et al., WACV 2024: colour conversion, 4:2:0 chroma
    subsampling, 8x8 DCT, the standard tables scaled to the quality, smooth rounding). Measured
    against libjpeg in docs/benchmarks.md. `rounding="straight_through"` gives the same images with
    the gradient of rounding taken as 1: the gradient is then that of the codec's linear part (colour
    conversion and chroma subsampling), undamped by the smooth rounding's 3*(x - round(x))**2.
    """
    from kornia.enhance import jpeg_codec_differentiable  # imported where used: only compression modes need it

    if not isinstance(quality, torch.Tensor) and not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be between 1 and 100, got {quality:g}")
    quality = torch.as_tensor(quality, dtype=torch.float32, device=images.device).reshape(-1)
    if quality.numel() not in (1, images.shape[0]):
        raise ValueError(f"{quality.numel()} qualities for {images.shape[0]} images")
    # checked on the device: reading the qualities back would hold the host until the GPU caught up
    torch._assert_async(((quality >= 1) & (quality <= 100)).all(), "JPEG quality must be between 1 and 100")
    with torch.autocast(images.device.type, enabled=False):  # in fp32 whatever the training precision
        unit = images.float().add(1).div(2).clamp(0, 1)
        straight_through = rounding == "straight_through" and unit.requires_grad  # no gradient asked: no proxy
        with torch.no_grad() if straight_through else contextlib.nullcontext():
            coded = jpeg_codec_differentiable(unit, quality.expand(images.shape[0]))
        if straight_through:
            linear = _chroma_subsampled(unit)
            coded = coded + (linear - linear.detach())
    return coded.mul(2).sub(1)


def _chroma_subsampled(unit: torch.Tensor) -> torch.Tensor:
    """RGB images in [0, 1] with their chroma halved and restored as JPEG 4:2:0 does (kornia's bilinear
    filters): the linear part of the codec, whose gradient the straight-through rounding passes on."""
    from kornia.color import rgb_to_ycbcr, ycbcr_to_rgb

    height, width = unit.shape[-2:]
    ycbcr = rgb_to_ycbcr(unit)
    chroma = torch.nn.functional.interpolate(ycbcr[:, 1:], size=((height + 1) // 2, (width + 1) // 2),
                                             mode="bilinear", align_corners=False, antialias=True)
    chroma = torch.nn.functional.interpolate(chroma, size=(height, width), mode="bilinear", align_corners=False)
    return ycbcr_to_rgb(torch.cat([ycbcr[:, :1], chroma], dim=1))


def trained_qualities(manifest: Manifest, loader: LoaderConfig) -> list[int]:
    """The JPEG qualities real samples carry in training: every one in loader.jpeg_distort's range,
    else those the shard set's manifest records."""
    if loader.jpeg_distort:
        return list(range(loader.jpeg_distort[0], loader.jpeg_distort[1] + 1))
    return sorted(int(q) for q in manifest.quality_histogram if q.isdigit())


def mismatched_qualities(quality: torch.Tensor, levels: torch.Tensor,
                         margin: int = MISMATCH_MARGIN) -> tuple[torch.Tensor, torch.Tensor]:
    """For each quality in [0, 1], a wrong one: one of the trained `levels` (also in [0, 1], on the same
    device) at least `margin` quality points away, drawn uniformly; and a mask of the images that have one
    (the others get an arbitrary level). All on the device, with no host read."""
    far = (levels[None, :] - quality[:, None]).abs() >= (margin - 0.5) / 100
    has_one = far.any(dim=1)
    # A uniform pick among the allowed levels as the first arrival of exponential clocks: torch.multinomial
    # would read its probabilities back to the host to check them.
    allowed = (far | ~has_one[:, None]).to(quality.dtype)
    picks = (allowed / torch.empty_like(allowed).exponential_()).argmax(dim=1)
    return levels[picks], has_one

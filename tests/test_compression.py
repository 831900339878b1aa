"""JPEG quality estimation from quantisation tables; the differentiable JPEG against libjpeg."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import torch

from cgan_pipe.compression import (STD_LUMINANCE_TABLE, estimate_jpeg_quality, mismatched_qualities, scaled_table,
                                   simulate_jpeg)

from conftest import cifar_members


def test_quality_50_is_the_standard_table():
    assert np.array_equal(scaled_table(STD_LUMINANCE_TABLE, 50), STD_LUMINANCE_TABLE)


@pytest.mark.parametrize("quality", [1, 10, 25, 49, 50, 51, 75, 90, 95, 99])
def test_estimate_recovers_the_quality_pillow_encoded_with(quality):
    image = Image.open(io.BytesIO(next(iter(cifar_members("test", 1).values()))))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    assert estimate_jpeg_quality(Image.open(out).quantization) == quality


def test_no_table_no_estimate():
    assert estimate_jpeg_quality(None) is None
    assert estimate_jpeg_quality({}) is None
    assert estimate_jpeg_quality({0: [1, 2, 3]}) is None


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two batches of images in [-1, 1], both rounded to 8 bits, from the mean MSE."""
    a, b = ((t.add(1).mul(127.5).round()) / 255 for t in (a, b))
    return float(10 * torch.log10(1 / (a - b).square().mean()))


@pytest.fixture(scope="module")
def cifar_batch() -> torch.Tensor:
    """200 real CIFAR-10 test images as NCHW in [-1, 1]."""
    pixels = [np.array(Image.open(io.BytesIO(b)).convert("RGB")) for b in cifar_members("test", 20).values()]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _libjpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for image in images.add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        out.append(np.array(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@pytest.mark.parametrize("quality, floor", [(10, 32.0), (30, 37.0), (50, 32.0), (75, 44.0), (95, 46.0)])
def test_simulated_jpeg_is_close_to_libjpeg(cifar_batch, quality, floor):
    real = _libjpeg(cifar_batch, quality)
    simulated = simulate_jpeg(cifar_batch, quality)
    assert _psnr(simulated, real) >= floor  # measured on these 200 images: see docs/benchmarks.md
    if quality <= 50:  # where JPEG visibly changes these (already q75) images, the simulation tracks it
        assert _psnr(simulated, real) > _psnr(cifar_batch, real) + 4


def test_straight_through_rounding_gives_the_same_images_and_an_undamped_gradient(cifar_batch):
    images = (cifar_batch[:8] * 0.9).requires_grad_(True)  # inside [-1, 1]: no pixel is clamped
    quality = torch.tensor([10.0, 40.0] * 4)
    smooth, straight = simulate_jpeg(images, quality), simulate_jpeg(images, quality, "straight_through")
    assert torch.allclose(smooth, straight, atol=1e-6)
    (smooth_grad,) = torch.autograd.grad(smooth.sum(), images)
    (straight_grad,) = torch.autograd.grad(straight.sum(), images)
    # the sum's gradient through colour conversion and chroma subsampling alone is 1 per pixel, up to
    # the rounding of the colour matrices; smooth rounding's slope 3*(x - round(x))**2 averages about 1/4
    assert straight_grad.mean().item() == pytest.approx(1.0, abs=0.01)
    assert smooth_grad.mean().item() < 0.5


def test_simulated_jpeg_takes_a_quality_per_image_and_passes_gradients(cifar_batch):
    images = cifar_batch[:4].clone().requires_grad_(True)
    out = simulate_jpeg(images, torch.tensor([10.0, 30.0, 75.0, 95.0]))
    for index, quality in enumerate((10, 30, 75, 95)):
        assert torch.allclose(out[index], simulate_jpeg(cifar_batch[index:index + 1], quality)[0], atol=1e-5)
    out.square().sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="between 1 and 100"):
        simulate_jpeg(cifar_batch[:2], 0)
    with pytest.raises(ValueError, match="3 qualities for 2 images"):
        simulate_jpeg(cifar_batch[:2], torch.tensor([10.0, 20.0, 30.0]))


def test_mismatched_qualities_are_trained_levels_at_least_ten_points_away():
    torch.manual_seed(0)
    quality = torch.tensor([0.10, 0.50, 0.90] * 100)
    wrong, has_one = mismatched_qualities(quality, torch.tensor([0.10, 0.50, 0.90]))
    assert has_one.all() and set(wrong.mul(100).round().int().tolist()) == {10, 50, 90}
    assert ((wrong - quality).abs() > 0.3).all()  # never the image's own level
    middle = torch.tensor([0.25, 0.10, 0.40])  # a range of levels, as loader.jpeg_distort gives
    wrong, has_one = mismatched_qualities(middle, torch.arange(10, 41) / 100)
    assert has_one.tolist() == [True, True, True]
    assert ((wrong - middle).abs() >= 0.095).all()
    # 20..30 has no level 10 points from 25: that image is masked out
    wrong, has_one = mismatched_qualities(torch.tensor([0.25, 0.20]), torch.arange(20, 31) / 100)
    assert has_one.tolist() == [False, True] and wrong[1].item() == pytest.approx(0.30)

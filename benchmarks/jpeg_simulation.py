"""PSNR between cgan-pipe's differentiable JPEG (compression.simulate_jpeg) and libjpeg (Pillow) on real images.

    python benchmarks/jpeg_simulation.py ../shared/data/cifar10/test.tar --n 1000 --quality 10,30,50,75,95
"""

from __future__ import annotations

import argparse
import io
import tarfile

import numpy as np
import torch
from PIL import Image

from cgan_pipe.compression import simulate_jpeg


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of two batches in [-1, 1], both rounded to 8 bits, from their mean squared error."""
    a, b = ((t.add(1).mul(127.5).round()) / 255 for t in (a, b))
    return float(10 * torch.log10(1 / (a - b).square().mean()))


def libjpeg(pixels: list[np.ndarray], quality: int) -> torch.Tensor:
    """The images JPEG-encoded by Pillow (libjpeg, 4:2:0) at `quality` and decoded, NCHW in [-1, 1]."""
    out = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        out.append(np.array(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tar", help="a tar of JPEG/PNG images")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--quality", default="10,30,50,75,95")
    args = parser.parse_args()
    pixels = []
    with tarfile.open(args.tar) as tar:
        for member in tar:
            if member.isfile() and len(pixels) < args.n:
                pixels.append(np.array(Image.open(tar.extractfile(member)).convert("RGB")))
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    print("| quality | PSNR(simulated, libjpeg) | PSNR(uncompressed, libjpeg) |\n| --- | --- | --- |")
    for quality in (int(q) for q in args.quality.split(",")):
        real = libjpeg(pixels, quality)
        with torch.no_grad():
            simulated = simulate_jpeg(images, quality)
        print(f"| {quality} | {psnr(simulated, real):.2f} dB | {psnr(images, real):.2f} dB |")


if __name__ == "__main__":
    main()

"""Draw the figures of docs/compression.md from trained checkpoints.

  python benchmarks/compression_grids.py quality CKPT OUT.png          # one row per requested quality
  python benchmarks/compression_grids.py ambient PLAIN AMBIENT SHARDS OUT.png
                                                                       # low-quality reals, plain GAN, ambient GAN

Images are enlarged 3x with nearest-neighbour sampling so the 8x8 JPEG blocks stay visible.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.utils import save_image

from cgan_pipe.config import LoaderConfig
from cgan_pipe.data.loader import open_loader
from cgan_pipe.generation import generate, load_generator
from cgan_pipe.train.checkpoint import load_checkpoint

CPU = torch.device("cpu")
QUALITIES = (10, 30, 50, 75, 95)
SCALE = 3


def _pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float in [0, 1]."""
    return images_uint8.float().div(255)


def _save(rows: list[torch.Tensor], out: Path) -> None:
    grid = torch.cat(rows)
    grid = torch.nn.functional.interpolate(grid, scale_factor=SCALE, mode="nearest")
    save_image(grid, out, nrow=rows[0].shape[0], padding=2, pad_value=1.0)
    print(f"wrote {out}")


def quality_grid(checkpoint: Path, out: Path, seed: int) -> None:
    """Rows: requested qualities (low to high); columns: the ten classes, one latent each."""
    G, info, z_dim = load_generator(load_checkpoint(checkpoint, map_location=CPU), ema=True, device=CPU)
    classes = torch.arange(max(info.num_classes, 1))
    seeds = [seed + i for i in range(len(classes))]
    _save([_pixels(generate(G, z_dim, seeds, classes, CPU, q)) for q in QUALITIES], out)


def ambient_grid(plain: Path, ambient: Path, shards: Path, out: Path, seed: int, low: int, high: int) -> None:
    """Rows: real images as training saw them (re-compressed at low..high), the plain GAN's samples,
    the ambient GAN's samples; the same classes in every column (two per class)."""
    cfg = LoaderConfig(backend="dali", device="cpu", hflip=False, jpeg_distort=[low, high])
    batch = next(iter(open_loader(shards, cfg, 500, seed, CPU)))
    order = torch.cat([torch.nonzero(batch.labels == c)[:2, 0] for c in range(10)])
    reals = batch.images[order].add(1).div(2)
    labels = batch.labels[order]
    seeds = [seed + i for i in range(len(labels))]
    rows = [reals]
    for checkpoint in (plain, ambient):
        G, _, z_dim = load_generator(load_checkpoint(checkpoint, map_location=CPU), ema=True, device=CPU)
        rows.append(_pixels(generate(G, z_dim, seeds, labels, CPU)))
    _save(rows, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="figure", required=True)
    q = sub.add_parser("quality")
    q.add_argument("checkpoint", type=Path)
    q.add_argument("out", type=Path)
    a = sub.add_parser("ambient")
    a.add_argument("plain", type=Path)
    a.add_argument("ambient", type=Path)
    a.add_argument("shards", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--low", type=int, default=10)
    a.add_argument("--high", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.figure == "quality":
        quality_grid(args.checkpoint, args.out, args.seed)
    else:
        ambient_grid(args.plain, args.ambient, args.shards, args.out, args.seed, args.low, args.high)


if __name__ == "__main__":
    main()

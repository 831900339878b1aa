"""Blockiness of images: the mean absolute step between neighbouring pixel columns across 8x8 JPEG
block edges, divided by that inside blocks (1.0: no block structure; real q10 JPEGs: about 2).

  python benchmarks/block_edges.py CHECKPOINT [CHECKPOINT ...] [--n 500]
  python benchmarks/block_edges.py --shards SHARDS [--jpeg-distort 10,40] [--n 2000]
"""

from __future__ import annotations

import argparse

import torch

from cgan_pipe.config import LoaderConfig
from cgan_pipe.data.loader import open_loader
from cgan_pipe.export import generate, load_generator
from cgan_pipe.train.checkpoint import load_checkpoint

CPU = torch.device("cpu")


def block_edge_ratio(images: torch.Tensor) -> float:
    """Edge steps over inside steps, for NCHW images whose width is a multiple of 8."""
    steps = (images[..., 1:] - images[..., :-1]).abs().mean(dim=(0, 1, 2))
    edges = torch.arange(1, steps.shape[0] + 1) % 8 == 0
    return float(steps[edges].mean() / steps[~edges].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument("--shards")
    parser.add_argument("--jpeg-distort", default=None, help="LO,HI: re-compress the shards' images first")
    parser.add_argument("--n", type=int, default=None)
    args = parser.parse_args()
    for checkpoint in args.checkpoints:
        n = args.n or 500
        G, info, z_dim = load_generator(load_checkpoint(checkpoint, map_location=CPU), ema=True, device=CPU)
        pixels = generate(G, z_dim, list(range(n)), torch.arange(n) % max(info.num_classes, 1), CPU)
        print(f"{checkpoint}: {block_edge_ratio(pixels.float()):.2f}")
    if args.shards:
        distort = [int(q) for q in args.jpeg_distort.split(",")] if args.jpeg_distort else None
        cfg = LoaderConfig(backend="dali", device="cpu", hflip=False, jpeg_distort=distort)
        images = next(iter(open_loader(args.shards, cfg, args.n or 2000, 0, CPU))).images
        print(f"{args.shards} (jpeg_distort {distort}): {block_edge_ratio(images):.2f}")


if __name__ == "__main__":
    main()

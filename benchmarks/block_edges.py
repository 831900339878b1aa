"""Blockiness of images: the mean absolute step between neighbouring pixels across 8x8 JPEG block
edges, divided by that inside blocks (metrics.quality.block_edge_ratio; 1.0: no block structure).

  python benchmarks/block_edges.py CHECKPOINT [CHECKPOINT ...] [--n 500]
  python benchmarks/block_edges.py --shards SHARDS [--jpeg-distort 10,40] [--n 2000]
  python benchmarks/block_edges.py --shards SHARDS --recompress 5,10,20,30,40,50,75,100 --n 1000
"""

from __future__ import annotations

import argparse

import torch

from cgan_pipe.config import LoaderConfig
from cgan_pipe.data.loader import open_loader
from cgan_pipe.generation import generate, load_generator
from cgan_pipe.metrics.quality import block_edge_ratio, block_steps, recompress
from cgan_pipe.train.checkpoint import load_checkpoint

CPU = torch.device("cpu")


def ratio(images: torch.Tensor) -> float:
    """The block-edge ratio of NCHW images."""
    return block_edge_ratio(block_steps(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument("--shards")
    parser.add_argument("--jpeg-distort", default=None, help="LO,HI: re-compress the shards' images first")
    parser.add_argument("--recompress", default=None, help="Q,Q,...: also each shard image re-encoded by libjpeg at Q")
    parser.add_argument("--n", type=int, default=None)
    args = parser.parse_args()
    for checkpoint in args.checkpoints:
        n = args.n or 500
        G, info, z_dim = load_generator(load_checkpoint(checkpoint, map_location=CPU), ema=True, device=CPU)
        pixels = generate(G, z_dim, list(range(n)), torch.arange(n) % max(info.num_classes, 1), CPU)
        print(f"{checkpoint}: {ratio(pixels.float()):.2f}")
    if args.shards:
        distort = [int(q) for q in args.jpeg_distort.split(",")] if args.jpeg_distort else None
        cfg = LoaderConfig(backend="dali", device="cpu", hflip=False, jpeg_distort=distort)
        images = next(iter(open_loader(args.shards, cfg, args.n or 2000, 0, CPU))).images
        print(f"{args.shards} (jpeg_distort {distort}): {ratio(images):.2f}")
        for quality in [int(q) for q in args.recompress.split(",")] if args.recompress else []:
            print(f"  re-encoded at q{quality}: {ratio(recompress(images, torch.full((len(images),), quality))):.2f}")


if __name__ == "__main__":
    main()

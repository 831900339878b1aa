"""How varied a (plain or ambient) generator's images are within a class: the mean pixel distance
(L2 over all values, [-1, 1] units) between two images of the same class, averaged over the classes.
0 when G ignores z (one image per class); the real CIFAR-10 shards read 37.2.

  python benchmarks/class_diversity.py CHECKPOINT [CHECKPOINT ...] [--per-class 20]
  python benchmarks/class_diversity.py --shards SHARDS [--per-class 20]

For each checkpoint it reports the raw G and its EMA: the EMA averages G's weights over recent steps,
so a G that hops between collapsed modes can look more varied (and foggier) through its EMA.
"""

from __future__ import annotations

import argparse

import torch

from cgan_pipe.config import LoaderConfig
from cgan_pipe.data.loader import open_loader
from cgan_pipe.generation import load_generator
from cgan_pipe.train.checkpoint import load_checkpoint

CPU = torch.device("cpu")


def class_diversity(images: torch.Tensor, labels: torch.Tensor, per_class: int) -> float:
    """Mean L2 distance between distinct images of the same class (the first `per_class` of each)."""
    distances = []
    for label in labels.unique():
        flat = images[labels == label][:per_class].flatten(1).float()
        if len(flat) > 1:
            distances.append(torch.cdist(flat, flat).sum() / (len(flat) * (len(flat) - 1)))
    return torch.stack(distances).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument("--shards")
    parser.add_argument("--per-class", type=int, default=20)
    args = parser.parse_args()
    for checkpoint in args.checkpoints:
        state = load_checkpoint(checkpoint, map_location=CPU)
        figures = []
        for ema in (False, True):
            G, info, z_dim = load_generator(state, ema=ema, device=CPU, fast=False)
            classes = max(info.num_classes, 1)
            labels = torch.arange(classes).repeat(args.per_class)
            z = torch.randn(len(labels), z_dim, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                images = G(z, labels, None)
            figures.append(f"{'EMA' if ema else 'raw'} {class_diversity(images, labels, args.per_class):.1f}")
        print(f"{checkpoint}: {', '.join(figures)}")
    if args.shards:
        cfg = LoaderConfig(backend="dali", device="cpu", hflip=False)
        batch = next(iter(open_loader(args.shards, cfg, 2000, 0, CPU)))
        print(f"{args.shards}: {class_diversity(batch.images, batch.labels, args.per_class):.1f}")


if __name__ == "__main__":
    main()

"""Scores of real images as a compression-mode run sees them, against the clean shards: what a
generator that reproduced the training data exactly (artefacts included) would score.

  python benchmarks/lowq_reference.py SHARDS --low 10 --high 40 [--n 5000] [--cache-dir DIR]

Real images from SHARDS are JPEG-compressed (libjpeg) at a quality drawn from LOW..HIGH, then scored
with the evaluator's 'classifier' and 'quality' metrics against SHARDS itself (the clean reference).
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from cgan_pipe.config import EvalConfig, LoaderConfig
from cgan_pipe.data.loader import open_loader
from cgan_pipe.metrics.evaluate import Evaluator
from cgan_pipe.metrics.quality import recompress

CPU = torch.device("cpu")


class CompressedReals(nn.Module):
    """A 'generator' that returns real images of the requested classes, JPEG-compressed at LOW..HIGH."""

    quality_conditioned = False

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, low: int, high: int):
        super().__init__()
        self.by_class = {int(c): images[labels == c] for c in labels.unique()}
        self.low, self.high = low, high

    def forward(self, z: torch.Tensor, labels: torch.Tensor, quality: None = None) -> torch.Tensor:
        picks = (z[:, 0].abs() * 1e6).long()
        reals = torch.stack([self.by_class[int(c)][int(p) % len(self.by_class[int(c)])]
                             for c, p in zip(labels, picks)])
        qualities = self.low + (z[:, 1].abs() * 1e6).long() % (self.high - self.low + 1)
        return recompress(reals, qualities)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards")
    parser.add_argument("--low", type=int, default=10)
    parser.add_argument("--high", type=int, default=40)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    loader_cfg = LoaderConfig(backend="dali", device="cpu")
    evaluator = Evaluator(args.shards, EvalConfig(metrics=["classifier", "quality"], n_samples=args.n,
                                                  cache_dir=args.cache_dir), loader_cfg, CPU)
    plain = LoaderConfig(backend="dali", device="cpu", hflip=False)
    batch = next(iter(open_loader(args.shards, plain, 10000, 7, CPU)))  # not the reference's first 10,000 order
    scores = evaluator(CompressedReals(batch.images, batch.labels, args.low, args.high), z_dim=8)
    print(json.dumps(scores, indent=2))


if __name__ == "__main__":
    main()

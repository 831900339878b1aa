"""How well the pixel quality regressor reads held-out images: real images re-compressed with libjpeg
at each quality, estimated, compared (mean estimate, mean absolute error, Spearman over all images).

  python benchmarks/quality_regressor.py REGRESSOR.pt SHARDS [--n 1000]

REGRESSOR.pt: a cached regressor (under ~/.cache/cgan-pipe/<shard set>/quality-regressor-<steps>.pt,
written by `cgan-pipe eval --metrics quality`); SHARDS: images it was not trained on, e.g.
`cgan-pipe prepare ../shared/data/cifar10/test.tar /tmp/test-shards`.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cgan_pipe.config import LoaderConfig
from cgan_pipe.data.loader import open_loader
from cgan_pipe.metrics.quality import QualityRegressor, estimate_pixel_quality, recompress, spearman

LEVELS = (10, 30, 50, 75, 95, 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("regressor")
    parser.add_argument("shards")
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    model = QualityRegressor()
    model.load_state_dict(torch.load(args.regressor, map_location="cpu", weights_only=True)["model"])
    model.eval()
    plain = LoaderConfig(backend="dali", device="cpu", hflip=False)
    images = next(iter(open_loader(args.shards, plain, args.n, 0, torch.device("cpu")))).images
    asked, estimated = [], []
    print("| requested | mean estimate | mean abs error |\n| --- | --- | --- |")
    for quality in LEVELS:
        estimates = estimate_pixel_quality(model, recompress(images, torch.full((len(images),), quality)))
        print(f"| {quality} | {estimates.mean():.1f} | {np.abs(estimates - quality).mean():.1f} |")
        asked.append(np.full(len(images), quality))
        estimated.append(estimates)
    print(f"Spearman over all {len(images) * len(LEVELS)} images: "
          f"{spearman(np.concatenate(asked), np.concatenate(estimated)):.3f}")


if __name__ == "__main__":
    main()

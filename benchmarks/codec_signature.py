"""Can a discriminator tell the differentiable JPEG from libjpeg by the codec alone?

A small CNN is trained to separate the same real images compressed at the same quality (drawn from
LO..HI per image) by libjpeg (torchvision) and by compression.simulate_jpeg (kornia). With --recode,
the libjpeg images pass through simulate_jpeg as well, as compression.ambient_recode_reals does in
training. Prints the classifier's accuracy over each 100 steps: 0.5 means it cannot tell them apart.

  python benchmarks/codec_signature.py SHARDS [--recode] [--qualities 10,40] [--steps 600]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from cgan_pipe.compression import simulate_jpeg
from cgan_pipe.config import LoaderConfig
from cgan_pipe.data.loader import open_loader
from cgan_pipe.metrics.quality import recompress

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards")
    parser.add_argument("--recode", action="store_true")
    parser.add_argument("--qualities", default="10,40", help="LO,HI")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    low, high = (int(q) for q in args.qualities.split(","))
    torch.manual_seed(0)
    batches = iter(open_loader(args.shards, LoaderConfig(backend="dali", device="cpu", threads=1), args.batch_size,
                               0, CPU))
    judge = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(32, 64, 4, 2, 1),
                          nn.LeakyReLU(0.2), nn.Conv2d(64, 64, 4, 2, 1), nn.LeakyReLU(0.2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(judge.parameters(), 1e-3)
    target = torch.cat([torch.ones(args.batch_size), torch.zeros(args.batch_size)])
    correct = []
    for step in range(1, args.steps + 1):
        images = next(batches).images
        quality = torch.randint(low, high + 1, (images.shape[0],))
        with torch.no_grad():
            real = recompress(images, quality)
            real = simulate_jpeg(real, quality.float()) if args.recode else real
            simulated = simulate_jpeg(images, quality.float())
        logits = judge(torch.cat([real, simulated])).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        correct.append(((logits > 0).float() == target).float().mean().item())
        if step % 100 == 0:
            print(f"step {step}: accuracy {sum(correct[-100:]) / 100:.3f}", flush=True)


if __name__ == "__main__":
    main()

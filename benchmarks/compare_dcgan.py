"""Score pytorch/examples' DCGAN beside a cgan-pipe checkpoint, with cgan-pipe's classifier metrics.

The peer is not part of cgan-pipe: fetch pytorch/examples, train its dcgan/main.py on the same
images for the same wall-clock budget, then point this script at its main.py and netG_epoch_*.pth.
Its generator is rebuilt by running the peer's own main.py (with --niter 0, so it trains nothing).

    python benchmarks/compare_dcgan.py --peer-main examples/dcgan/main.py --peer-netg out/netG_epoch_2.pth \
        --ours runs/cifar/checkpoints/ckpt-0012345.pt --shards runs/cifar/shards --out docs/img/compare
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from cgan_pipe.config import config_from_dict
from cgan_pipe.generation import load_generator
from cgan_pipe.metrics.evaluate import Evaluator
from cgan_pipe.train.checkpoint import load_checkpoint


class PeerGenerator(nn.Module):
    """The peer's unconditional netG behind cgan-pipe's G(z, labels) call (labels are ignored)."""

    quality_conditioned = False

    def __init__(self, net_g: nn.Module):
        super().__init__()
        self.net_g = net_g

    def forward(self, z: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor | None = None) -> torch.Tensor:
        return self.net_g(z[:, :, None, None])


def load_peer(main: Path, weights: Path) -> tuple[nn.Module, int]:
    """The peer's netG with `weights`, built by its own script; returns (generator, latent size)."""
    argv = sys.argv
    with tempfile.TemporaryDirectory() as out:
        sys.argv = [str(main), "--dataset", "fake", "--niter", "0", "--workers", "0", "--netG", str(weights),
                    "--outf", out, "--manualSeed", "0"]
        try:
            peer = runpy.run_path(str(main), run_name="peer_dcgan")
        finally:
            sys.argv = argv
    return PeerGenerator(peer["netG"]).eval().requires_grad_(False), int(peer["nz"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-main", type=Path, required=True)
    parser.add_argument("--peer-netg", type=Path, required=True)
    parser.add_argument("--ours", type=Path, required=True, help="a cgan-pipe checkpoint")
    parser.add_argument("--shards", type=Path, required=True, help="the real shard set both trained on")
    parser.add_argument("--n", type=int, default=10000, help="generated images per model")
    parser.add_argument("--out", type=Path, required=True, help="folder for scores.json and the grids")
    args = parser.parse_args()

    device = torch.device("cpu")
    state = load_checkpoint(args.ours)
    cfg = config_from_dict(state["config"])
    eval_cfg = config_from_dict({**state["config"], "eval": {**state["config"]["eval"], "n_samples": args.n}}).eval
    evaluator = Evaluator(args.shards, eval_cfg, cfg.loader, device)
    ours, _, z_dim = load_generator(state, True, device)
    peer, nz = load_peer(args.peer_main, args.peer_netg)
    scores = {"cgan-pipe": {"checkpoint": str(args.ours), **evaluator(ours, z_dim)},
              "pytorch/examples dcgan": {"checkpoint": str(args.peer_netg), **evaluator(peer, nz)}}
    del scores["pytorch/examples dcgan"]["class_accuracy"]  # unconditional: its samples have no requested class

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        labels = torch.arange(10).repeat_interleave(10)
        grid_ours = ours(torch.randn(100, z_dim, generator=generator), labels)
        grid_peer = peer(torch.randn(100, nz, generator=generator), labels)
    save_image(grid_ours.add(1).div(2).clamp(0, 1), args.out / "cgan-pipe.png", nrow=10, padding=1)
    save_image(grid_peer.add(1).div(2).clamp(0, 1), args.out / "pytorch-examples-dcgan.png", nrow=10, padding=1)
    print(json.dumps(scores, indent=2))


if __name__ == "__main__":
    main()

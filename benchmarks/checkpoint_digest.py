"""sha256 of a checkpoint's contents less its wall-clock field, to show that two runs trained the same thing.

A checkpoint file's own sha256 differs between any two runs, even of the same code and seed: it records
`train_seconds`, the wall-clock time training took. This digest covers everything else (weights, optimiser
and RNG states, step, config, dataset, shard hash), tensor by tensor in key order.

    python benchmarks/checkpoint_digest.py runs/cifar/checkpoints/ckpt-0000300.pt [more.pt ...] [--skip config]

`--skip config` leaves the stored config out too: a version that adds a config key (with a default that
changes nothing) stores one more key, so only the weights, optimiser and RNG states can be compared then.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import torch

from cgan_pipe.train.checkpoint import load_checkpoint

WALL_CLOCK = ("train_seconds",)


def digest(state: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    """sha256 over a checkpoint's entries other than WALL_CLOCK and `skip`: tensors by their bytes, dtype and
    shape."""
    hasher = hashlib.sha256()

    def feed(key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            hasher.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
            hasher.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for name in sorted(value, key=str):
                feed(f"{key}.{name}", value[name])
        elif isinstance(value, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict)) for v in value):
            for i, item in enumerate(value):
                feed(f"{key}[{i}]", item)
        else:
            hasher.update(f"{key}={json.dumps(value, sort_keys=True, default=str)}".encode())

    for key in sorted(k for k in state if k not in WALL_CLOCK + tuple(skip)):
        feed(key, state[key])
    return hasher.hexdigest()


if __name__ == "__main__":
    args, skipped = sys.argv[1:], ()
    if "--skip" in args:
        at = args.index("--skip")
        skipped, args = (args[at + 1],), args[:at] + args[at + 2:]
    for path in args:
        print(f"{digest(load_checkpoint(path), skipped)}  {path}")

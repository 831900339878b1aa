"""How much R1 + R2 raise training's memory per image, per family: the factor `starter.PENALTY_FACTOR` holds.

For each family and resolution, `cgan-pipe bench train` runs at two batch sizes with the hinge loss and no
penalty, then with R3GAN's rpgan loss and R1 + R2 on every step (so the penalty step is in every peak). The
peak resident memory of each run (the training runs in the command's own process) gives the memory per image:
(peak at the larger batch - peak at the smaller) / the difference in images. The factor is the ratio of the
two per-image figures.

    python benchmarks/penalty_memory.py --data ../shared/data/cifar10/test.tar [--json penalty-memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FAMILIES = ("dcgan", "resnet", "r3gan")
WIDTH = 128  # as starter.MIB_PER_IMAGE was measured
BUDGET_MIB = 1000  # the larger batch is sized to use about this much by starter.MIB_PER_IMAGE
PENALTIES = ["--loss", "rpgan", "--r1", "1", "--r2", "1", "--r1-every", "1"]


def peak_mib(command: list[str]) -> float:
    """Peak resident memory of `command`'s process, MiB."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024


def batches(family: str, resolution: int) -> tuple[int, int]:
    """A small and a large batch: the large one uses about BUDGET_MIB by the starter's table."""
    from cgan_pipe.starter import MIB_PER_IMAGE

    large = max(16, min(256, int(BUDGET_MIB / MIB_PER_IMAGE[resolution][family])))
    return large // 4, large


def per_image_mib(shards: Path, family: str, resolution: int, penalised: bool) -> float:
    """Training memory per image of the batch for `family` on `shards`, with or without R1 + R2."""
    small, large = batches(family, resolution)
    peaks = [peak_mib([sys.executable, "-m", "cgan_pipe", "bench", "train", str(shards), "--arch", family,
                       "--batch-size", str(batch), "--width", str(WIDTH), "--steps", "2", "--compile", "off",
                       "--precision", "bf16", "--channels-last", "on", "--backend", "torch", "--device", "cpu", "-q",
                       *(PENALTIES if penalised else [])]) for batch in (small, large)]
    return (peaks[1] - peaks[0]) / (large - small)


def main() -> int:
    """Measure and print (and with --json write) each family's factor at 32 and 64 px."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="an image tar (CIFAR-10's test.tar)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as temp:
        for resolution in (32, 64):
            shards = Path(temp) / f"shards-{resolution}"
            subprocess.run([sys.executable, "-m", "cgan_pipe", "prepare", str(args.data), str(shards), "--resolution",
                            str(resolution), "--limit", "800", "-q"], check=True, stdout=subprocess.DEVNULL)
            for family in FAMILIES:
                plain, penalised = (per_image_mib(shards, family, resolution, p) for p in (False, True))
                results.append({"family": family, "resolution": resolution, "width": WIDTH,
                                "batches": batches(family, resolution),
                                "mib_per_image": round(plain, 2), "mib_per_image_r1_r2": round(penalised, 2),
                                "factor": round(penalised / plain, 2)})
                print(json.dumps(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

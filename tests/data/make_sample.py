"""Make cifar10-sample.tar.gz, the suite's CIFAR-10 sample, from the full CIFAR-10 tars: the first 80 JPEGs of
each class of test.tar and the first 40 of train.tar, in archive order, with their member names unchanged.

    python tests/data/make_sample.py [CIFAR10_DIR]     # default: ../shared/data/cifar10 beside the project

The members are written with fixed metadata (mtime 0, root owner), so the same tars give the same sample.
"""

from __future__ import annotations

import gzip
import io
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
PER_CLASS = {"test": 80, "train": 40}


def first_per_class(tar_path: Path, split: str, per_class: int) -> dict[str, bytes]:
    """The first `per_class` JPEGs of each class under `split/` in a CIFAR-10 tar: {member name: bytes},
    in archive order."""
    out: dict[str, bytes] = {}
    counts: dict[str, int] = defaultdict(int)
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile() or not member.name.startswith(f"{split}/"):
                continue
            cls = member.name.split("/")[1]
            if counts[cls] < per_class:
                out[member.name] = tar.extractfile(member).read()
                counts[cls] += 1
    return out


def sample_members(cifar: Path) -> list[tuple[str, bytes]]:
    """(member name, bytes) of the sample, split by split, each in its tar's order."""
    return [item for split, per_class in PER_CLASS.items()
            for item in first_per_class(cifar / f"{split}.tar", split, per_class).items()]


def write_sample(members: list[tuple[str, bytes]], path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    with open(path, "wb") as out, gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as packed:
        packed.write(raw.getvalue())


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data" / "cifar10"
    write_sample(sample_members(source), HERE / "cifar10-sample.tar.gz")
    print(f"wrote {HERE / 'cifar10-sample.tar.gz'}")

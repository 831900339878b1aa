"""What a loader hands the trainer, whichever backend: Batch, DatasetInfo, the Loader protocol, and the
parsing of a sample's class and quality."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from ..errors import ConfigError, DataError
from .epochs import EpochMark
from .manifest import Manifest, ShardInfo


@dataclass
class Batch:
    """One training batch.

    images: float NCHW in [-1, 1] on the training device; labels: int64 class ids
    (zeros for unlabelled data); quality: float JPEG quality in [0, 1], or None;
    mark: where the loader's epoch stood when the batch was made (None where a
    loader cannot say). N is the batch size, or fewer for the last batch of an
    epoch (no sample is dropped).
    """

    images: torch.Tensor
    labels: torch.Tensor
    quality: torch.Tensor | None = None
    mark: EpochMark | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """What networks are built from: the data's shape and classes."""

    resolution: int
    channels: int
    class_names: tuple[str, ...]
    num_samples: int

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for unlabelled data)."""
        return len(self.class_names)


class Loader(Protocol):
    """An endless iterator of batches plus the dataset's description, this rank's epoch size and the number
    of streams its batches' marks count shards in."""

    info: DatasetInfo
    samples_per_epoch: int
    streams: int

    def __iter__(self) -> Iterator[Batch]: ...


def shards_of_rank(manifest: Manifest, shards: Path | str, rank: int, world: int, why: str, instead: str
                   ) -> list[ShardInfo]:
    """This rank's shards when a loader splits a set by whole shards (shard i goes to rank i % world);
    ConfigError naming the set when some rank would get none (`why` the loader splits so, `instead` what
    else to do)."""
    mine = manifest.shards[rank::world]
    if not mine:
        raise ConfigError(f"{shards}: {len(manifest.shards)} shards cannot be shared by {world} ranks ({why}); "
                          f"prepare with a smaller --shard-size{instead}")
    return mine


def dataset_info(manifest: Manifest) -> DatasetInfo:
    """The DatasetInfo recorded in a shard set's manifest."""
    return DatasetInfo(manifest.resolution, 3, tuple(manifest.class_names), manifest.num_samples)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device` without making the host wait for it: a host tensor bound for a GPU goes through
    page-locked memory with a non-blocking copy (from pageable memory the driver may wait for the stream, i.e.
    for the training step queued before it). The source may be reused at once: the copy is of a pinned copy."""
    if device.type != "cuda" or tensor.is_cuda:
        return tensor.to(device, non_blocking=True)
    return tensor.pin_memory().to(device, non_blocking=True)


def parse_quality(meta: bytes | None) -> float:
    """A sample's JPEG quality in [0, 1] from its `.json` bytes; NaN when it records none."""
    try:
        quality = json.loads(meta)["quality"] if meta else None
    except (ValueError, KeyError, TypeError):
        return float("nan")
    return quality / 100 if isinstance(quality, (int, float)) else float("nan")


def known_qualities(quality: torch.Tensor, shards: object) -> torch.Tensor:
    """`quality` (a batch's values from parse_quality) as float32; DataError naming the shard set when a
    sample recorded none (NaN)."""
    if quality.isnan().any():
        raise DataError(f"{shards}: a sample's .json records no JPEG quality; run `cgan-pipe verify {shards}`")
    return quality.to(torch.float32)


def checked_labels(labels: torch.Tensor, info: DatasetInfo, shards: object) -> torch.Tensor:
    """`labels` (class ids of a batch, on the CPU); DataError naming the shard set when one is not a class of
    its manifest, which a network's class embedding would fail on far from the cause."""
    outside = (labels < 0) | (labels >= info.num_classes)
    if outside.any():
        raise DataError(f"{shards}: a sample's .cls is {int(labels[outside][0])}, but the manifest lists "
                        f"{info.num_classes} classes (0-{info.num_classes - 1}); run `cgan-pipe verify {shards}` to "
                        f"find it, and prepare the shards again")
    return labels


def parse_ascii_labels(raw: torch.Tensor) -> torch.Tensor:
    """Decimal class ids from `.cls` bytes, one zero-padded row of ASCII per sample -> int64.

    DALI hands `.cls` members over as raw bytes ("3" arrives as 51). Whitespace and the zero
    padding are ignored; a row with any other byte, or with no digit, raises DataError rather
    than becoming a wrong label.
    """
    raw = raw.to(torch.int64)
    digits = raw - ord("0")
    valid = (digits >= 0) & (digits <= 9)
    ignorable = (raw == 0) | (raw == ord(" ")) | (raw == ord("\n")) | (raw == ord("\r")) | (raw == ord("\t"))
    bad = (~(valid | ignorable)).any(dim=1) | ~valid.any(dim=1)
    if bad.any():
        row = raw[int(bad.nonzero()[0])]
        text = bytes(int(b) for b in row if b).decode("latin-1")
        raise DataError(f"a sample's .cls holds {text!r}, not a class id; run `cgan-pipe verify` on the shards")
    value = torch.zeros(raw.shape[0], dtype=torch.int64, device=raw.device)
    for column in range(raw.shape[1]):
        value = torch.where(valid[:, column], value * 10 + digits[:, column], value)
    return value

"""The loader contract: shard set -> endless stream of training batches, whichever backend."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from ..config import LoaderConfig, default_cache_dir
from ..errors import ConfigError, DataError
from .manifest import Manifest, read_manifest, read_remote_manifest
from .verify import check_checksums

log = logging.getLogger(__name__)
CHECKED_SHARDS = "checked-shards.json"  # in the cache folder: shards whose checksum matched, by size and mtime


@dataclass
class Batch:
    """One training batch.

    images: float NCHW in [-1, 1] on the training device; labels: int64 class ids
    (zeros for unlabelled data); quality: float JPEG quality in [0, 1], or None.
    N is the batch size, or fewer for the last batch of an epoch (no sample is dropped).
    """

    images: torch.Tensor
    labels: torch.Tensor
    quality: torch.Tensor | None = None


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
    """An endless iterator of batches plus the dataset's description and this rank's epoch size."""

    info: DatasetInfo
    samples_per_epoch: int

    def __iter__(self) -> Iterator[Batch]: ...


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of its torch.distributed group ((0, 1) without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def dataset_info(manifest: Manifest) -> DatasetInfo:
    """The DatasetInfo recorded in a shard set's manifest."""
    return DatasetInfo(manifest.resolution, 3, tuple(manifest.class_names), manifest.num_samples)


def is_url(shards: Path | str) -> bool:
    """Whether `shards` names a shard set by URL (http(s)://, s3://, ...) rather than a local folder."""
    return "://" in str(shards) and not str(shards).startswith("file://")


def shard_set_manifest(shards: Path | str) -> Manifest:
    """The checked manifest of the shard set in a folder or at a URL."""
    return read_remote_manifest(str(shards)) if is_url(shards) else read_manifest(Path(shards))


def open_loader(shards: Path | str, cfg: LoaderConfig, batch_size: int, seed: int, device: torch.device,
                whole: bool = False, with_quality: bool = False) -> Loader:
    """Open the shard set at `shards` (a folder, or for the torch backend a URL) with the backend
    `cfg.backend`, yielding Batches on `device`: this rank's part of the samples, or all of them
    when `whole` (for work only one rank does, such as evaluation). With `with_quality`, each
    Batch carries the JPEG quality of its samples in [0, 1]: the one drawn by `cfg.jpeg_distort`,
    else the one in their `.json`."""
    if is_url(shards) and cfg.backend == "dali":
        raise ConfigError(f"{shards}: the DALI loader reads local or mounted files only; copy or mount the "
                          f"shards, or set loader.backend: torch to stream them from the URL")
    manifest = shard_set_manifest(shards)
    if not is_url(shards):
        shards = Path(shards)
        for shard in manifest.shards:  # a truncated, emptied or replaced shard fails here, not mid-training
            size = (shards / shard.tar).stat().st_size
            if size != shard.bytes:
                raise DataError(f"{shards / shard.tar}: {size} bytes where the manifest says {shard.bytes} "
                                f"(truncated or replaced); run `cgan-pipe verify {shards}`, and prepare the "
                                f"shards again if it fails")
        check_checksums(shards, manifest, default_cache_dir() / CHECKED_SHARDS)
    log.info(f"{shards}: {cfg.backend} loader on {device.type} ({cfg.device} decoding asked), {cfg.threads} "
             f"threads, batches of {batch_size} from {manifest.num_samples} samples in {len(manifest.shards)} shards")
    if with_quality and not cfg.jpeg_distort:  # a distorted sample's quality is the one drawn for it
        check_quality_metadata(manifest, shards)
    if batch_size > manifest.num_samples:
        raise ConfigError(
            f"train.batch_size: {batch_size} is larger than the {manifest.num_samples} samples in {shards}"
        )
    part = (0, 1) if whole else (None, None)
    if cfg.backend == "dali":
        from .dali_loader import DaliLoader  # DALI is imported only when asked for

        return DaliLoader(shards, manifest, cfg, batch_size, seed, device, *part, with_quality=with_quality)
    from .torch_loader import TorchLoader

    return TorchLoader(shards, manifest, cfg, batch_size, seed, device, *part, with_quality=with_quality)


def check_quality_metadata(manifest: Manifest, shards: Path | str) -> None:
    """Raise ConfigError unless every sample of the set records a JPEG quality (per its manifest)."""
    unknown = [q for q in manifest.quality_histogram if not q.isdigit()]
    if unknown or not manifest.quality_histogram:
        raise ConfigError(
            f"{shards}: {sum(manifest.quality_histogram.get(q, 0) for q in unknown)} samples have no JPEG quality "
            f"(PNG/WebP or unknown); make a quality-labelled set with `cgan-pipe prepare SOURCE OUT --format jpeg "
            f"--reencode --quality 10,30,50,75,95` (one sample per quality, or --quality-mode random)"
        )


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


def known_qualities(quality: torch.Tensor, shards: Path | str) -> torch.Tensor:
    """`quality` (a batch's values from parse_quality) as float32; DataError naming the shard set when a
    sample recorded none (NaN)."""
    if quality.isnan().any():
        raise DataError(f"{shards}: a sample's .json records no JPEG quality; run `cgan-pipe verify {shards}`")
    return quality.to(torch.float32)


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

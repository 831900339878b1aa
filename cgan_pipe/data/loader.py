"""Open a shard set as an endless stream of training batches (data/batch.py's contract) with the chosen backend."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterator

import torch

from ..config import LoaderConfig, default_cache_dir
from ..devices import available_memory, gib
from ..errors import ConfigError, DataError
from .batch import Batch, Loader
from .epochs import LoaderPosition
from ..locations import location
from .bucket import check_objects
from .manifest import MANIFEST_NAME, Manifest, shard_set_manifest
from .verify import check_checksums

log = logging.getLogger(__name__)
CHECKED_SHARDS = "checked-shards.json"  # in the cache folder: shards whose checksum matched, by file identity


def open_loader(shards: Path | str, cfg: LoaderConfig, batch_size: int, seed: int, device: torch.device,
                whole: bool = False, with_quality: bool = False, start: LoaderPosition | None = None) -> Loader:
    """Open the shard set at `shards` (a folder, or a URL such as s3://bucket/prefix) with the backend
    `cfg.backend`, yielding Batches on `device`: this rank's part of the samples, or all of them
    when `whole` (for work only one rank does, such as evaluation). With `with_quality`, each
    Batch carries the JPEG quality of its samples in [0, 1]: the one drawn by `cfg.jpeg_distort`,
    else the one in their `.json`. Each epoch's order is seeded by (`seed`, epoch); opened at `start`
    (a position batches' marks gave), the loader goes on within that epoch (data/epochs.py)."""
    shards = location(shards, "loader.shards")
    if isinstance(shards, str) and cfg.backend == "dali" and cfg.bucket_reads == "samples" \
            and not shards.startswith("s3://"):
        raise ConfigError(f"loader.bucket_reads: samples reads s3:// only (DALI's own S3 client), not {shards}; "
                          f"set loader.bucket_reads: shards")
    manifest = shard_set_manifest(shards)
    if isinstance(shards, str):  # a missing or replaced shard fails here, not mid-training (http lists nothing)
        if not shards.startswith(("http://", "https://")):
            check_objects(shards, {**{s.tar: s.bytes for s in manifest.shards},
                                   **{s.index: None for s in manifest.shards}}, f"{shards}/{MANIFEST_NAME}")
    else:
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
    most = max(32, 4 * (os.cpu_count() or 1))
    if cfg.threads > most:  # each a thread or a forked process: thousands would exhaust the machine first
        raise ConfigError(f"loader.threads: {cfg.threads} is more than {most} (four per core of this machine's "
                          f"{os.cpu_count()}); a few per core keep a loader fed")
    cfg = _fitted_shuffle_buffer(cfg, manifest, shards)
    part = (0, 1) if whole else (None, None)
    if cfg.backend == "dali":
        from .dali_loader import DaliLoader  # DALI is imported only when asked for

        return DaliLoader(shards, manifest, cfg, batch_size, seed, device, *part, with_quality=with_quality,
                          start=start)
    from .torch_loader import TorchLoader

    return TorchLoader(shards, manifest, cfg, batch_size, seed, device, *part, with_quality=with_quality,
                       start=start)


def _fitted_shuffle_buffer(cfg: LoaderConfig, manifest: Manifest, shards: Path | str) -> LoaderConfig:
    """`cfg` with a shuffle buffer no larger than the shard set (a larger one holds the whole set all the same);
    ConfigError when the encoded samples it holds (in each DataLoader worker, for the torch backend) would not
    fit in the memory free, which DALI finds out only after minutes, as std::bad_alloc."""
    samples = min(cfg.shuffle_buffer, manifest.num_samples)
    copies = cfg.threads if cfg.backend == "torch" else 1
    mean = sum(shard.bytes for shard in manifest.shards) / max(1, manifest.num_samples)
    need, free = int(samples * copies * mean), available_memory(torch.device("cpu"))
    if need > free:
        raise ConfigError(f"loader.shuffle_buffer: {samples:,} samples of {shards} (about {mean / 1024:,.1f} KiB each"
                          f"{f', in each of {copies} workers' if copies > 1 else ''}) would hold {gib(need)}, more "
                          f"than the {gib(free)} of memory free; lower it")
    if samples < cfg.shuffle_buffer:
        log.info(f"loader.shuffle_buffer: {cfg.shuffle_buffer} is more than the {samples} samples of {shards}; "
                 f"{samples} hold them all")
    return dataclasses.replace(cfg, shuffle_buffer=samples)


def first_samples(shards: Path | str, cfg: LoaderConfig, n: int, device: torch.device) -> Iterator[Batch]:
    """The first `n` samples (at most all) of the whole shard set's seeded stream (seed 0), in batches of up
    to 250 on `device`, one pass at most: the fixed real images that metrics compare with."""
    n = min(n, shard_set_manifest(shards).num_samples)
    loader = open_loader(shards, cfg, min(250, n), seed=0, device=device, whole=True)
    seen = 0
    for batch in loader:
        take = min(batch.images.shape[0], n - seen)
        quality = batch.quality[:take] if batch.quality is not None else None
        yield Batch(batch.images[:take], batch.labels[:take], quality)
        seen += take
        if seen >= n:
            return


def check_quality_metadata(manifest: Manifest, shards: Path | str) -> None:
    """Raise ConfigError unless every sample of the set records a JPEG quality (per its manifest)."""
    unknown = [q for q in manifest.quality_histogram if not q.isdigit()]
    if unknown or not manifest.quality_histogram:
        raise ConfigError(
            f"{shards}: {sum(manifest.quality_histogram.get(q, 0) for q in unknown)} samples have no JPEG quality "
            f"(PNG/WebP or unknown); make a quality-labelled set with `cgan-pipe prepare SOURCE OUT --format jpeg "
            f"--reencode --quality 10,30,50,75,95` (one sample per quality, or --quality-mode random)"
        )



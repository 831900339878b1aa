"""The loader contract without DALI: webdataset + torchvision decode in a torch DataLoader; shards
may be local or at a URL."""

from __future__ import annotations

import functools
import gc
import io
import random
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, encode_jpeg
from torchvision.transforms import v2

from ..config import LoaderConfig
from ..errors import DataError
from ..images import ANY_IMAGE_EXTENSION
from ..interrupts import ignore_stop_signals
from ..processes import child_initializer
from ..devices import resolve_device
from ..distributed import rank_and_world
from .batch import (Batch, DatasetInfo, checked_labels, dataset_info, known_qualities, parse_quality, shards_of_rank,
                    to_device)
from ..locations import is_url
from .bucket import read_checked
from .epochs import EpochMark, LoaderPosition, epoch_shards, where_to_start
from .manifest import MANIFEST_NAME, Manifest, ShardInfo

FETCH_THREADS = 2  # per DataLoader worker: shards fetched at once, ahead of the one being read
AHEAD_SHARDS = 4  # per DataLoader worker, at most (and within its part of the cache)


def _augmentations(cfg: LoaderConfig, resolution: int) -> v2.Transform:
    """The augmentations of the DALI pipeline, from torchvision (CPU or CUDA uint8 CHW images)."""
    steps = []
    if cfg.resized_crop_min_scale is not None:
        steps.append(v2.RandomResizedCrop(resolution, scale=(cfg.resized_crop_min_scale, 1.0), antialias=True))
    if cfg.pad_crop:
        steps.append(v2.RandomCrop(resolution, padding=cfg.pad_crop, fill=0))
    if cfg.color_jitter:
        steps.append(v2.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter,
                                    saturation=cfg.color_jitter))
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps) if steps else v2.Identity()


def jpeg_distort(image: torch.Tensor, quality: int) -> torch.Tensor:
    """A uint8 CHW image on the CPU JPEG-encoded at `quality` with libjpeg (4:2:0) and decoded again."""
    return decode_jpeg(encode_jpeg(image, quality=quality), mode=ImageReadMode.RGB)


class _DecodeSample:
    """Picklable per-sample transform in the DataLoader workers: (image bytes, cls bytes[, json bytes])
    -> (augmented uint8 CHW, label, JPEG quality in [0, 1] or NaN). With loader.jpeg_distort the
    image is then JPEG-compressed at a quality drawn from the range, which becomes its quality."""

    def __init__(self, cfg: LoaderConfig, resolution: int):
        self.augment = _augmentations(cfg, resolution)
        self.distort = cfg.jpeg_distort

    def __call__(self, sample: tuple[bytes, ...]) -> tuple[torch.Tensor, int, float]:
        data, cls, *meta = sample
        image, label = self.augment(_decode_on_cpu(data)), int(cls) if cls else 0
        if self.distort:  # the worker's torch RNG is seeded by the DataLoader
            quality = int(torch.randint(self.distort[0], self.distort[1] + 1, ()))
            return jpeg_distort(image, quality), label, quality / 100
        return image, label, parse_quality(meta[0] if meta else None)


def _keep_encoded(sample: tuple[bytes, ...]) -> tuple[torch.Tensor, int, float]:
    """Per-sample transform when decoding happens later, batched on the GPU: bytes as a uint8 tensor."""
    data, cls, *meta = sample
    return (torch.frombuffer(bytearray(data), dtype=torch.uint8), int(cls) if cls else 0,
            parse_quality(meta[0] if meta else None))


def _collate_encoded(samples: list[tuple[torch.Tensor, int, float, torch.Tensor]]
                     ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    return ([data for data, *_ in samples], torch.tensor([s[1] for s in samples], dtype=torch.int64),
            torch.tensor([s[2] for s in samples], dtype=torch.float64), torch.stack([s[3] for s in samples]))


def _decode_on_cpu(data: bytes | torch.Tensor) -> torch.Tensor:
    encoded = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_image(encoded, mode=ImageReadMode.RGB)


def _decode_batch(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode a batch: its JPEGs in one decode_jpeg call on `device` (nvJPEG on a GPU), any PNG/WebP
    on the CPU; in the order given."""
    is_jpeg = [bool(e[:2].tolist() == [0xFF, 0xD8]) for e in encoded]
    jpegs = [e for e, j in zip(encoded, is_jpeg) if j]
    decoded = iter(_decode_jpegs(jpegs, device) if jpegs else [])
    return [next(decoded) if j else to_device(_decode_on_cpu(e), device) for e, j in zip(encoded, is_jpeg)]


def _decode_jpegs(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEGs decoded on `device`; on a GPU, by nvJPEG (torchvision) into memory no queued kernel still uses.

    On a GPU, torchvision allocates the outputs on the caller's current stream and writes them from a stream of
    its own that does not wait for the caller's (pytorch/vision#9606): a block freed by the training step,
    whose kernels are still queued, can be handed to the decoder and overwritten under them. Here the
    outputs are allocated with a side stream current, whose blocks the training stream never frees, and
    each is recorded as used by the training stream, so it is not handed out again before that use ends.
    """
    if device.type != "cuda":
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    side = _side_stream(torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index))
    with torch.cuda.stream(side):
        decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    training = torch.cuda.current_stream(device)
    training.wait_stream(side)
    for image in decoded:
        image.record_stream(training)
    return decoded


class TorchLoader:
    """Endless batches from a shard set with webdataset readers in DataLoader workers.

    Images are decoded on the CPU in the workers, or, when the loader device
    is cuda, read there as bytes and decoded a batch at a time with nvJPEG
    (torchvision.io.decode_jpeg on the GPU); normalised to [-1, 1] on the
    training device. With loader.jpeg_distort the workers decode on the CPU
    whatever the device: the distortion is libjpeg's, on the CPU, so a GPU
    decode would send every image back and forth. No sample is dropped:
    each worker's last batch of an epoch may be smaller. Each rank of a
    torch.distributed job (or `rank` of `world_size`, when given) reads every
    `world_size`-th shard from its `rank`-th: `samples_per_epoch` samples,
    each once per epoch. Each worker is a stream of epochs.py: it reads its
    share of each epoch's seeded shard order, and its batches carry its
    EpochMark; opened at `start`, each worker goes on within that epoch.
    """

    def __init__(self, shards: Path | str, manifest: Manifest, cfg: LoaderConfig, batch_size: int,
                 seed: int, device: torch.device, rank: int | None = None, world_size: int | None = None,
                 with_quality: bool = False, start: LoaderPosition | None = None):
        self.info: DatasetInfo = dataset_info(manifest)
        self.device = device
        self.shards = shards
        self.with_quality = with_quality
        self.distort = cfg.jpeg_distort
        # with a GPU, workers only read bytes and the batch is decoded at once with nvJPEG
        self.gpu_decode = resolve_device(cfg.device, "loader.device").type == "cuda" and not self.distort
        self.augment = _augmentations(cfg, manifest.resolution)
        rank, world = (rank, world_size) if rank is not None and world_size is not None else rank_and_world()
        mine = shards_of_rank(manifest, shards, rank, world, "the torch loader splits by whole shards", "")
        self.samples_per_epoch: int = sum(s.samples for s in mine)  # this rank's share
        # each worker reads its own shards of each epoch (epochs.py); from a bucket, fetched whole and checked
        self.streams = cfg.threads
        epochs = _EpochShards(mine, seed, self.streams, where_to_start(start, mine, seed, self.streams))
        opened = wds.DataPipeline(
            epochs, _FetchShards(shards, (cfg.bucket_cache_mb << 20) // max(1, cfg.threads)),
            wds.pipelinefilter(tar_file_expander)(), wds.pipelinefilter(group_by_keys)(),
        )
        dataset = wds.DataPipeline(
            opened,
            wds.shuffle(cfg.shuffle_buffer, rng=random.Random(seed)),  # each worker a copy: seeded runs repeat
            # unlabelled sets have no `.cls`; a labelled sample without one is an error
            wds.to_tuple(ANY_IMAGE_EXTENSION, "cls", *(["json"] if with_quality and not self.distort else []),
                         missing_is_error=manifest.labelled),
            wds.map(_keep_encoded if self.gpu_decode else _DecodeSample(cfg, manifest.resolution)),
            wds.map(epochs.marked),
        )
        generator = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(
            dataset, batch_size=batch_size, drop_last=False, num_workers=cfg.threads,
            persistent_workers=True, pin_memory=device.type == "cuda" and not self.gpu_decode, generator=generator,
            collate_fn=_collate_encoded if self.gpu_decode else None,
            worker_init_fn=child_initializer(ignore_stop_signals),
        )

    def __iter__(self) -> Iterator[Batch]:
        # The DataLoader forks its workers on the first pass. Garbage this process still holds, a DALI pipeline
        # among it, would be inherited and collected in a worker, where DALI's shutdown waits forever for threads
        # that were not forked: collect it here first.
        gc.collect()
        while True:  # one pass of the DataLoader is one epoch
            for images, labels, quality, marks in _naming_failures(self.loader, self.shards):
                if self.gpu_decode:
                    decoded = _decode_batch(images, self.device)
                    images = torch.stack([self.augment(image) for image in decoded])
                # non-blocking: a blocking copy to a GPU waits for the training step queued before it
                images = to_device(images, self.device).float().div_(127.5).sub_(1.0)
                if self.info.num_classes:
                    labels = checked_labels(labels, self.info, self.shards)
                yield Batch(images=images, labels=to_device(labels, self.device),
                            quality=to_device(known_qualities(quality, self.shards), self.device)
                            if self.with_quality else None, mark=EpochMark(*marks[-1].tolist()))


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream a GPU's decodes allocate their outputs on (one per GPU, made once)."""
    return torch.cuda.Stream(device)


class _EpochShards(IterableDataset):
    """The first stage of a DataLoader worker's pipeline: the worker's shards of each epoch in order
    (epochs.epoch_shards, one stream per worker), a pass per epoch, counting the shards it has started so
    that `marked` can tag each sample it hands over with the worker's EpochMark."""

    def __init__(self, shards: list[ShardInfo], seed: int, streams: int, start: LoaderPosition | None):
        self.shards, self.seed, self.streams, self.start = shards, seed, streams, start
        self.epoch = start.epoch if start else 0
        self.current = self.stream = self.started = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        self.stream = info.id if info is not None else 0
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip = self.start.skipped(self.stream, self.streams) if self.start and epoch == self.start.epoch else 0
        self.current, self.started = epoch, skip
        for shard in epoch_shards(self.shards, self.seed, epoch, self.stream, self.streams)[skip:]:
            self.started += 1
            yield {"shard": shard}

    def marked(self, sample: tuple) -> tuple:
        """`sample` with this worker's mark as it is handed over: (epoch, stream, shards started)."""
        return (*sample, torch.tensor([self.current, self.stream, self.started], dtype=torch.int64))


class _FetchShards:
    """webdataset stage (in each DataLoader worker): each shard of the set at `where` with a stream of its
    bytes: a folder's file opened; a bucket's object fetched whole by fsspec (s3fs retries with backoff) and
    checked against the manifest's size and sha256, the next ones fetched ahead by threads while the current
    one is read, at most AHEAD_SHARDS and about `cache_bytes` of them (always at least the next), so that a
    request's round trip is hidden behind the reading and memory stays flat."""

    def __init__(self, where: Path | str, cache_bytes: int):
        self.where, self.manifest, self.cache_bytes = where, f"{where}/{MANIFEST_NAME}", cache_bytes

    def __call__(self, shards: Iterator[dict]) -> Iterator[dict]:
        if not is_url(self.where):
            for sample in shards:
                path = Path(self.where) / sample["shard"].tar
                with open(path, "rb") as stream:
                    yield {"url": str(path), "stream": stream}
            return
        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
            pending: deque[tuple[str, int, Future]] = deque()
            held = 0  # bytes fetched, or being fetched, ahead of the shard being read
            for sample in shards:
                shard, url = sample["shard"], f"{self.where}/{sample['shard'].tar}"
                pending.append((url, shard.bytes, pool.submit(read_checked, url, shard.bytes, shard.sha256,
                                                               self.manifest)))
                held += shard.bytes
                # the next stays in flight while one is read
                while len(pending) > 1 and (held > self.cache_bytes or len(pending) > AHEAD_SHARDS):
                    ahead, size, fetched = pending.popleft()
                    held -= size
                    yield {"url": ahead, "stream": io.BytesIO(fetched.result())}
            for ahead, _, fetched in pending:
                yield {"url": ahead, "stream": io.BytesIO(fetched.result())}


def _naming_failures(loader: DataLoader, shards: Path) -> Iterator[tuple[torch.Tensor, ...]]:
    """`loader`'s batches, with a worker's failure on a sample (undecodable image, a `.cls` that is
    not a number) turned into a DataError naming the shard set. A worker's own DataError (a shard
    that cannot be fetched, or whose bytes are not the manifest's) keeps its message, without the worker's
    traceback that torch adds to it."""
    try:
        yield from loader
    except DataError as exc:
        raise DataError(str(exc).strip().splitlines()[-1].removeprefix(f"{DataError.__module__}.DataError: ")) \
            from None
    except (RuntimeError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise DataError(f"{shards}: the torch loader failed on a sample ({(lines[-1] if lines else '')[:300]}); "
                        f"run `cgan-pipe verify {shards}` to list the bad samples") from exc

"""DALI pipeline: webdataset shards -> decode (GPU nvJPEG or CPU) -> augment -> [-1, 1] torch batches."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ..config import LoaderConfig
from ..images import ANY_IMAGE_EXTENSION
from ..devices import resolve_device
from ..distributed import rank_and_world
from ..errors import DataError
from .batch import (Batch, DatasetInfo, checked_labels, dataset_info, known_qualities, parse_ascii_labels,
                    parse_quality, shards_of_rank, to_device)
from ..locations import is_url, join
from .epochs import EpochMark, LoaderPosition
from .manifest import Manifest
from .shard_stream import ShardStream

READER_NAME = "shards"
LABEL_BYTES = 8  # `.cls` bytes are padded to at least this width so a batch is one dense tensor


@pipeline_def
def _shard_pipeline(paths: list[str], index_paths: list[str], labelled: bool, augment: LoaderConfig,
                    resolution: int, shuffle_buffer: int, decode_device: str, shard_id: int, num_shards: int,
                    with_meta: bool = False, stream: ShardStream | None = None):
    """Shards -> (images, label bytes[, quality][, marks]): the quality output is the drawn distortion
    quality with augment.jpeg_distort, else the `.json` bytes, when `with_meta`. The samples come from
    `stream` (with each batch's mark), or from DALI's webdataset reader over `paths` (s3:// objects read by
    DALI's S3 client)."""
    read_meta = with_meta and not augment.jpeg_distort  # a drawn quality replaces the recorded one
    marks = None
    if stream is not None:
        encoded, cls, *meta, marks = fn.external_source(source=stream, num_outputs=4 if read_meta else 3,
                                                        dtype=types.UINT8, cycle="raise")
    else:
        encoded, cls, *meta = fn.readers.webdataset(
            paths=paths, index_paths=index_paths,
            ext=[ANY_IMAGE_EXTENSION, "cls"] + (["json"] if read_meta else []),
            # a labelled set with a sample lacking `.cls` is corrupt; unlabelled sets have none
            missing_component_behavior="error" if labelled else "empty",
            random_shuffle=True, initial_fill=shuffle_buffer,
            shard_id=shard_id, num_shards=num_shards, name=READER_NAME,
            # the last batch of an epoch is padded (the iterator drops the padding) rather than filled
            # from the next epoch: each rank then sees each of its samples exactly once per epoch
            pad_last_batch=True,
        )
    decoded = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
    if augment.resized_crop_min_scale is not None:
        decoded = fn.random_resized_crop(decoded, size=(resolution, resolution),
                                         random_area=[augment.resized_crop_min_scale, 1.0])
    if augment.pad_crop:
        side = resolution + 2 * augment.pad_crop  # a centred window larger than the image pads it
        decoded = fn.crop(decoded, crop=(side, side), out_of_bounds_policy="pad", fill_values=0)
        decoded = fn.crop(decoded, crop=(resolution, resolution),
                          crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
                          crop_pos_y=fn.random.uniform(range=(0.0, 1.0)))
    if augment.color_jitter:
        jitter = (1.0 - augment.color_jitter, 1.0 + augment.color_jitter)
        decoded = fn.color_twist(decoded, brightness=fn.random.uniform(range=jitter),
                                 contrast=fn.random.uniform(range=jitter), saturation=fn.random.uniform(range=jitter))
    distort_quality = None
    if augment.jpeg_distort:  # last, so the 8x8 block grid D sees is the one JPEG used
        low, high = augment.jpeg_distort
        distort_quality = fn.random.uniform(values=list(range(low, high + 1)), dtype=types.INT32)
        decoded = fn.jpeg_compression_distortion(decoded, quality=distort_quality)
    mirror = fn.random.coin_flip(probability=0.5) if augment.hflip else 0
    images = fn.crop_mirror_normalize(
        decoded, dtype=types.FLOAT, output_layout="CHW",
        mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror,
    )
    outputs = [images, fn.pad(cls, fill_value=0, shape=(LABEL_BYTES,))]
    if with_meta:  # the sample's quality: the one drawn above, else its `.json` bytes (zero-padded, parsed in torch)
        outputs.append(distort_quality if distort_quality is not None else fn.pad(meta[0], fill_value=0))
    if marks is not None:
        outputs.append(marks)
    return tuple(outputs)


class DaliLoader:
    """Endless batches from a shard set through a DALI pipeline.

    Decodes on the GPU (`mixed`, nvJPEG) when the resolved loader device is
    cuda, else on the CPU (`device_id=None`, no GPU needed). Each rank of a
    torch.distributed job (or `rank` of `world_size`, when given) reads its own
    whole shards (shard i goes to rank i % world size), read ahead by a
    ShardStream in a seeded order per epoch: `samples_per_epoch` of them, each
    once per epoch, the last batch of an epoch smaller when they are not a whole
    number of batches. Each batch carries its EpochMark; opened at `start`, the
    loader goes on within that epoch. With `loader.bucket_reads: samples`, DALI's
    own reader splits a bucket's samples between the ranks instead, and batches
    carry no mark.
    """

    streams = 1

    def __init__(self, shards: Path | str, manifest: Manifest, cfg: LoaderConfig, batch_size: int,
                 seed: int, device: torch.device, rank: int | None = None, world_size: int | None = None,
                 with_quality: bool = False, start: LoaderPosition | None = None):
        self.info: DatasetInfo = dataset_info(manifest)
        self.device = device
        self.shards = shards
        self.labelled = manifest.labelled
        self.with_quality = with_quality
        self.distorted = bool(cfg.jpeg_distort)
        rank, world = (rank, world_size) if rank is not None and world_size is not None else rank_and_world()
        gpu = torch.cuda.current_device() if resolve_device(cfg.device, "loader.device").type == "cuda" else None
        stream = None
        if not (is_url(shards) and cfg.bucket_reads == "samples"):  # see docs/decisions.md
            mine = shards_of_rank(manifest, shards, rank, world, "the dali loader splits by whole shards", "")
            stream = ShardStream(shards, mine, batch_size, seed + rank, cfg.shuffle_buffer,
                                 cfg.bucket_cache_mb << 20, manifest.labelled,
                                 with_meta=with_quality and not cfg.jpeg_distort, start=start)
        self.pipeline = _shard_pipeline(
            paths=[str(join(shards, s.tar)) for s in manifest.shards],
            index_paths=[str(join(shards, s.index)) for s in manifest.shards],
            labelled=manifest.labelled, augment=cfg, resolution=manifest.resolution, shuffle_buffer=cfg.shuffle_buffer,
            decode_device="mixed" if gpu is not None else "cpu", shard_id=rank, num_shards=world,
            batch_size=batch_size, num_threads=cfg.threads, device_id=gpu, seed=seed + rank,
            prefetch_queue_depth=2, with_meta=with_quality, stream=stream,
        )
        try:  # the iterator runs the pipeline for its first batches at once: a bad sample can fail here
            self.pipeline.build()
            self._iterator = DALIGenericIterator(
                self.pipeline, ["images", "labels"] + (["quality"] if with_quality else [])
                + (["marks"] if stream else []),
                reader_name=None if stream else READER_NAME, last_batch_policy=LastBatchPolicy.PARTIAL,
                auto_reset=True,
            )
        except RuntimeError as exc:
            raise _failure(exc, shards) from exc
        self.samples_per_epoch: int = stream.samples if stream else self._iterator.size  # this rank's share

    def __iter__(self) -> Iterator[Batch]:
        while True:  # one pass of the inner loop is one epoch; auto_reset starts the next
            for outputs in _naming_failures(self._iterator, self.shards):
                out = outputs[0]
                # Labels and qualities are parsed on the CPU (DALI's readers hand them over there), then copied
                # to the GPU without blocking: a blocking copy waits for the training step queued before it.
                images = to_device(out["images"], self.device)
                labels = to_device(checked_labels(parse_ascii_labels(out["labels"]), self.info, self.shards),
                                   self.device) if self.labelled \
                    else torch.zeros(images.shape[0], dtype=torch.int64, device=self.device)
                quality = None
                if self.with_quality:
                    quality = out["quality"].reshape(-1).float().div(100) if self.distorted else \
                        _qualities(out["quality"], self.shards)
                    quality = to_device(quality, self.device)
                mark = None
                if "marks" in out:  # the same for every sample of the batch
                    epoch, started = out["marks"][-1].numpy().view(np.int64).tolist()
                    mark = EpochMark(epoch, 0, started)
                yield Batch(images=images, labels=labels, quality=quality, mark=mark)


def _qualities(meta: torch.Tensor, shards: Path) -> torch.Tensor:
    """JPEG qualities in [0, 1] from a batch of zero-padded `.json` byte rows."""
    return known_qualities(torch.tensor([parse_quality(bytes(row[row != 0].tolist())) for row in meta.cpu()]),
                           shards)


def _naming_failures(iterator: Iterator[list[dict[str, torch.Tensor]]], shards: Path
                     ) -> Iterator[list[dict[str, torch.Tensor]]]:
    """`iterator`, with a failure of the DALI pipeline (undecodable image, missing `.cls`) turned
    into a DataError naming the shard set; DALI's own message (which names the file) is kept."""
    try:
        yield from iterator
    except RuntimeError as exc:
        raise _failure(exc, shards) from exc


def _failure(exc: RuntimeError, shards: Path | str) -> DataError:
    """The DataError for a failure of the DALI pipeline on the shard set `shards`: DALI's first line, then
    its own reason (e.g. nvImageCodec's), and what to do."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line for line in lines if "failure" in line.lower() and "pipeline" not in line.lower()), "")
    detail = "; ".join(dict.fromkeys(line for line in (lines[:1] + [reason]) if line))
    return DataError(f"{shards}: the DALI loader failed on a sample ({detail[:300]}); run `cgan-pipe verify "
                     f"{shards}` to list the bad samples, and prepare the shards again")

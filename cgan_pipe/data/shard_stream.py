"""The samples of a shard set (in a folder, or in a bucket) as batches of raw bytes for DALI's external source:
whole shards read ahead by threads into a bounded memory cache (from a bucket, each checked against the
manifest), in a seeded order per epoch, each batch marked with where its epoch stands (data/epochs.py)."""

from __future__ import annotations

import random
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DataError
from ..images import EXTENSIONS
from ..locations import is_url
from .bucket import read_checked
from .epochs import LoaderPosition, epoch_shards, where_to_start
from .manifest import MANIFEST_NAME, IndexEntry, ShardInfo, read_dali_index

FETCH_THREADS = 4
AHEAD_SHARDS = 8  # read ahead of the one in use, at most (and within the cache): enough to hide a request's wait
MARK_BYTES = 16  # a batch's mark as a sample's last output: (epoch, shards started) as two int64
_IMAGE_EXTENSIONS = set(EXTENSIONS.values())


class ShardStream:
    """An iterable over epochs of batches [images, classes(, metas), marks], each a list of uint8 arrays (the
    raw member bytes; an empty array for a missing `.cls`; the batch's mark), made of this rank's `shards`
    of the set at `where` (a folder, or a URL).

    Each pass is one epoch: its shards are read in an order seeded by (seed, epoch) and their samples mixed
    in a buffer of `shuffle_buffer`; up to `cache_bytes` of shards are held (always at least one), read
    ahead by threads. When a bucket's shards all fit, they are kept and fetched only once; otherwise each is
    read once per epoch and dropped after use. The last batch of an epoch is smaller when the samples do not
    fill it. Opened at `start`, the first pass is that epoch less the shards the position says were started.
    """

    def __init__(self, where: Path | str, shards: list[ShardInfo], batch_size: int, seed: int,
                 shuffle_buffer: int, cache_bytes: int, labelled: bool, with_meta: bool,
                 start: LoaderPosition | None = None):
        self.where, self.shards, self.batch_size, self.seed = where, shards, batch_size, seed
        self.shuffle_buffer, self.cache_bytes = shuffle_buffer, cache_bytes
        self.remote = is_url(where)
        self.keep_all = self.remote and sum(s.bytes for s in shards) <= cache_bytes
        self._kept: dict[str, np.ndarray] = {}
        start = where_to_start(start, shards, seed, 1)
        self._epoch = start.epoch if start else 0
        self._skip = start.skipped(0, 1) if start else 0
        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:  # the index files, read once
            indexes = list(pool.map(lambda s: read_dali_index(where, s.index), shards))
        # each shard's samples as an array (samples, outputs, 2) of byte spans: 48 bytes a sample
        self._spans = {s.tar: np.array([_spans(files, f"{where}/{s.index}", labelled, with_meta) for files in index],
                                       dtype=np.int64).reshape(-1, 3 if with_meta else 2, 2)
                       for s, index in zip(shards, indexes)}
        self.samples = sum(len(samples) for samples in self._spans.values())

    def __iter__(self) -> Iterator[list[list[np.ndarray]]]:
        epoch, skip = self._epoch, self._skip
        self._epoch, self._skip = epoch + 1, 0
        rng = random.Random(f"{self.seed}:{epoch}:samples")
        started = skip
        buffer: list[list[np.ndarray]] = []
        batch: list[list[np.ndarray]] = []

        def marked(samples: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
            mark = np.array([epoch, started], dtype=np.int64).view(np.uint8)
            return [list(column) for column in zip(*samples)] + [[mark] * len(samples)]

        for shard, data in self._read(epoch_shards(self.shards, self.seed, epoch, 0, 1)[skip:]):
            started += 1
            for spans in self._spans[shard.tar].tolist():
                # views when every shard stays in memory anyway; else copies, so that a sample in the shuffle
                # buffer does not keep its whole shard alive
                sample = [data[start:end] for start, end in spans]
                buffer.append(sample if self.keep_all else [part.copy() for part in sample])
                if len(buffer) >= self.shuffle_buffer:  # a random one out: swapped to the end, then popped
                    pick = rng.randrange(len(buffer))
                    buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                    batch.append(buffer.pop())
                    if len(batch) == self.batch_size:
                        yield marked(batch)
                        batch = []
        rng.shuffle(buffer)
        for sample in buffer:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield marked(batch)
                batch = []
        if batch:
            yield marked(batch)

    def _read(self, order: list[ShardInfo]) -> Iterator[tuple[ShardInfo, np.ndarray]]:
        """The shards of `order` with their bytes, read ahead within the cache's bound: all of it when every
        shard is kept anyway, else at most AHEAD_SHARDS, so that memory is flat from the first shards on."""
        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
            pending: deque[tuple[ShardInfo, Future]] = deque()
            held = 0
            upcoming = iter(order)
            nxt = next(upcoming, None)
            while pending or nxt is not None:
                while nxt is not None and (not pending or (held + nxt.bytes <= self.cache_bytes and (
                        self.keep_all or len(pending) < AHEAD_SHARDS))):
                    pending.append((nxt, pool.submit(self._shard_bytes, nxt)))
                    held += nxt.bytes
                    nxt = next(upcoming, None)
                shard, future = pending.popleft()
                yield shard, future.result()
                held -= shard.bytes

    def _shard_bytes(self, shard: ShardInfo) -> np.ndarray:
        if not self.remote:  # checked against the manifest's sha256 when the loader opened the folder
            data = np.fromfile(Path(self.where) / shard.tar, dtype=np.uint8)
            if len(data) != shard.bytes:
                raise DataError(f"{Path(self.where) / shard.tar}: {len(data)} bytes where the manifest says "
                                f"{shard.bytes} (changed while training); run `cgan-pipe verify {self.where}`")
            return data
        if shard.tar in self._kept:
            return self._kept[shard.tar]
        data = np.frombuffer(read_checked(f"{self.where}/{shard.tar}", shard.bytes, shard.sha256,
                                          f"{self.where}/{MANIFEST_NAME}"), dtype=np.uint8)
        if self.keep_all:
            self._kept[shard.tar] = data
        return data


def _spans(files: list[IndexEntry], index: str, labelled: bool, with_meta: bool) -> list[tuple[int, int]]:
    """Where a sample's image, class (and meta) are in its shard, as (start, end) byte offsets ((0, 0): none);
    DataError naming the index when a labelled sample lacks its class or any sample its image."""
    by_ext = {f.ext: f for f in files}
    image = next((f for f in files if f.ext in _IMAGE_EXTENSIONS), None)
    if image is None or (labelled and "cls" not in by_ext):
        missing = "an image" if image is None else "a .cls"
        raise DataError(f"{index}: sample {files[0].name.split('.')[0] if files else '?'} has no {missing} "
                        f"member; run `cgan-pipe verify` on the shard set")
    wanted = [image, by_ext.get("cls")] + ([by_ext.get("json")] if with_meta else [])
    return [(f.offset, f.offset + f.size) if f is not None else (0, 0) for f in wanted]

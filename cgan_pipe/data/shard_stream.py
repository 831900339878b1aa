"""The samples of a shard set in a bucket as batches of raw bytes for DALI's external source: whole shards
fetched ahead by threads into a bounded memory cache, each checked against the manifest and fetched once
per epoch, in a seeded order."""

from __future__ import annotations

import random
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np

from ..errors import DataError
from ..images import EXTENSIONS
from .bucket import read_bytes, read_checked
from .manifest import MANIFEST_NAME, IndexEntry, ShardInfo, parse_dali_index

FETCH_THREADS = 4
_IMAGE_EXTENSIONS = set(EXTENSIONS.values())


class ShardStream:
    """An iterable over one epoch of batches [images, classes(, metas)], each a list of uint8 arrays (the raw
    member bytes; an empty array for a missing `.cls`), made of this rank's `shards` of the set at `url`.

    Shards are read in a new seeded order each epoch and their samples mixed in a buffer of
    `shuffle_buffer`; up to `cache_bytes` of shards are held (always at least one), fetched ahead by
    threads. When all of them fit, they are kept and fetched only once; otherwise each is fetched once per
    epoch and dropped after use. The last batch of an epoch is smaller when the samples do not fill it.
    """

    def __init__(self, url: str, shards: list[ShardInfo], batch_size: int, seed: int, shuffle_buffer: int,
                 cache_bytes: int, labelled: bool, with_meta: bool):
        self.url, self.shards, self.batch_size = url, shards, batch_size
        self.shuffle_buffer, self.cache_bytes = shuffle_buffer, cache_bytes
        self.labelled, self.with_meta = labelled, with_meta
        self.keep_all = sum(s.bytes for s in shards) <= cache_bytes
        self._kept: dict[str, bytes] = {}
        self._epoch = 0
        self._rng = random.Random(seed)
        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:  # the index files, from the bucket
            texts = list(pool.map(lambda s: read_bytes(f"{url}/{s.index}").decode(), shards))
        self._index = {s.tar: parse_dali_index(f"{url}/{s.index}", text) for s, text in zip(shards, texts)}
        self.samples = sum(len(samples) for samples in self._index.values())

    def __iter__(self) -> Iterator[list[list[np.ndarray]]]:
        order = list(self.shards)
        random.Random(f"{self._rng.random()}:{self._epoch}").shuffle(order)
        self._epoch += 1
        buffer: list[list[np.ndarray]] = []
        batch: list[list[np.ndarray]] = []
        for shard, data in self._fetched(order):
            for files in self._index[shard.tar]:
                buffer.append(self._sample(shard, files, data))
                if len(buffer) >= self.shuffle_buffer:
                    batch.append(buffer.pop(self._rng.randrange(len(buffer))))
                    if len(batch) == self.batch_size:
                        yield _columns(batch)
                        batch = []
        self._rng.shuffle(buffer)
        for sample in buffer:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield _columns(batch)
                batch = []
        if batch:
            yield _columns(batch)

    def _fetched(self, order: list[ShardInfo]) -> Iterator[tuple[ShardInfo, memoryview]]:
        """The shards of `order` with their bytes, fetched ahead within the cache's bound."""
        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
            pending: deque[tuple[ShardInfo, Future]] = deque()
            held = 0
            upcoming = iter(order)
            nxt = next(upcoming, None)
            while pending or nxt is not None:
                while nxt is not None and (not pending or held + nxt.bytes <= self.cache_bytes):
                    pending.append((nxt, pool.submit(self._fetch, nxt)))
                    held += nxt.bytes
                    nxt = next(upcoming, None)
                shard, future = pending.popleft()
                yield shard, memoryview(future.result())
                held -= shard.bytes

    def _fetch(self, shard: ShardInfo) -> bytes:
        if shard.tar in self._kept:
            return self._kept[shard.tar]
        data = read_checked(f"{self.url}/{shard.tar}", shard.bytes, shard.sha256, f"{self.url}/{MANIFEST_NAME}")
        if self.keep_all:
            self._kept[shard.tar] = data
        return data

    def _sample(self, shard: ShardInfo, files: list[IndexEntry], data: memoryview) -> list[np.ndarray]:
        """[image, class(, meta)] of one sample as arrays over the shard's bytes."""
        by_ext = {f.ext: f for f in files}
        image = next((f for f in files if f.ext in _IMAGE_EXTENSIONS), None)
        if image is None or (self.labelled and "cls" not in by_ext):
            missing = "an image" if image is None else "a .cls"
            raise DataError(f"{self.url}/{shard.tar}: sample {files[0].name.split('.')[0] if files else '?'} has "
                            f"no {missing} member; run `cgan-pipe verify {self.url}`")
        wanted = [image, by_ext.get("cls")] + ([by_ext.get("json")] if self.with_meta else [])
        # copies: a view would keep the whole shard alive for as long as the sample is in the shuffle buffer
        return [np.array(data[f.offset:f.offset + f.size], dtype=np.uint8) if f is not None
                else np.zeros(0, dtype=np.uint8) for f in wanted]


def _columns(samples: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """A batch as one list per output."""
    return [list(column) for column in zip(*samples)]

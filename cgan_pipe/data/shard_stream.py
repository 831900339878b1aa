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
        self.keep_all = sum(s.bytes for s in shards) <= cache_bytes
        self._kept: dict[str, np.ndarray] = {}
        self._rng = random.Random(seed)
        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:  # the index files, from the bucket
            texts = list(pool.map(lambda s: read_bytes(f"{url}/{s.index}").decode(errors="replace"), shards))
        self._spans = {s.tar: [_spans(files, f"{url}/{s.index}", labelled, with_meta)
                               for files in parse_dali_index(f"{url}/{s.index}", text)]
                       for s, text in zip(shards, texts)}
        self.samples = sum(len(samples) for samples in self._spans.values())

    def __iter__(self) -> Iterator[list[list[np.ndarray]]]:
        order = list(self.shards)
        self._rng.shuffle(order)
        buffer: list[list[np.ndarray]] = []
        batch: list[list[np.ndarray]] = []
        for shard, data in self._fetched(order):
            for spans in self._spans[shard.tar]:
                # views when every shard stays in memory anyway; else copies, so that a sample in the shuffle
                # buffer does not keep its whole shard alive
                sample = [data[start:end] for start, end in spans]
                buffer.append(sample if self.keep_all else [part.copy() for part in sample])
                if len(buffer) >= self.shuffle_buffer:  # a random one out: swapped to the end, then popped
                    pick = self._rng.randrange(len(buffer))
                    buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                    batch.append(buffer.pop())
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

    def _fetched(self, order: list[ShardInfo]) -> Iterator[tuple[ShardInfo, np.ndarray]]:
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
                yield shard, future.result()
                held -= shard.bytes

    def _fetch(self, shard: ShardInfo) -> np.ndarray:
        if shard.tar in self._kept:
            return self._kept[shard.tar]
        data = np.frombuffer(read_checked(f"{self.url}/{shard.tar}", shard.bytes, shard.sha256,
                                          f"{self.url}/{MANIFEST_NAME}"), dtype=np.uint8)
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


def _columns(samples: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """A batch as one list per output."""
    return [list(column) for column in zip(*samples)]

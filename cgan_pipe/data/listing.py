"""A source's items on disk, read back by position, and the seeded shuffle of positions.

prepare holds no per-image list in memory: a source streams its items into a
listing file, and each worker computes which positions its shard holds and
reads those records. Memory therefore does not grow with the archive.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from array import array
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from ..atomic import process_alive
from ..errors import DataError

_RECORD = struct.Struct("<qqiBH")  # span offset, span size (-1: none), group, flags, path length; then the path
_DUPLICATE = 1  # flag: a later copy of a path already listed
_FLUSH_BYTES = 1 << 20
_DUPLICATE_BUCKETS = 64  # duplicate search works on one 64th of the path hashes at a time
_LISTING_PREFIX = ".listing-"


class SourceItem(NamedTuple):  # a tuple: cheap to build and to send to workers
    """One input image: where it lives (recorded as `source` in shards), its class id, and
    for images inside an archive file, the (offset, size) of its bytes there."""

    path: str
    label: int | None
    span: tuple[int, int] | None = None


class Listing:
    """The items of a source, on disk: `listing[i]` is the i-th item; `entry(i)` also says
    whether it repeats an earlier item's path. Picklable; files open lazily in each process."""

    def __init__(self, base: Path, count: int, group_labels: list[int | None]):
        self.base = base
        self.count = count
        self.group_labels = group_labels  # group id (e.g. a folder) -> class id
        self._files: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, position: int) -> SourceItem:
        return self.entry(position)[0]

    def __iter__(self) -> Iterator[SourceItem]:
        return (self[i] for i in range(self.count))

    def entry(self, position: int) -> tuple[SourceItem, bool]:
        """The item at `position` and whether it is a duplicate of an earlier one."""
        if not 0 <= position < self.count:
            raise IndexError(position)
        index_fd, records_fd = self._open()
        (offset,) = struct.unpack("<q", os.pread(index_fd, 8, 8 * position))
        record = os.pread(records_fd, 512, offset)
        span_offset, span_size, group, flags, length = _RECORD.unpack_from(record)
        if _RECORD.size + length > len(record):
            record = os.pread(records_fd, _RECORD.size + length, offset)
        path = record[_RECORD.size:_RECORD.size + length].decode("utf-8", "surrogateescape")
        span = (span_offset, span_size) if span_size >= 0 else None
        return SourceItem(path, self.group_labels[group], span), bool(flags & _DUPLICATE)

    def close(self) -> None:
        """Close this process's handles on the files."""
        if self._files is not None:
            for fd in self._files:
                os.close(fd)
            self._files = None

    def remove(self) -> None:
        """Close and delete the listing's files."""
        self.close()
        for suffix in (".index", ".records"):
            Path(f"{self.base}{suffix}").unlink(missing_ok=True)

    def _open(self) -> tuple[int, int]:
        if self._files is None:
            self._files = (os.open(f"{self.base}.index", os.O_RDONLY), os.open(f"{self.base}.records", os.O_RDONLY))
        return self._files

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_files": None}

    def __del__(self) -> None:
        self.close()


class ListingWriter:
    """Streams items into a listing at `base` (files `base.records`, `base.index`).

    `add(path, group, span)`; `finish(group_labels)` returns the Listing. With
    `find_duplicates`, every repeat of a path already added is flagged (the
    first copy is the one used), found a bucket of path hashes at a time.
    """

    def __init__(self, base: Path, find_duplicates: bool = False):
        self.base = Path(base)
        self.count = 0
        self._records = open(f"{self.base}.records", "wb")
        self._index = open(f"{self.base}.index", "wb")
        self._record_buffer, self._index_buffer, self._position = bytearray(), array("q"), 0
        self._buckets = [open(f"{self.base}.hashes-{b}", "wb") for b in range(_DUPLICATE_BUCKETS)] \
            if find_duplicates else None

    def add(self, path: str, group: int, span: tuple[int, int] | None = None) -> None:
        """Append one item."""
        encoded = path.encode("utf-8", "surrogateescape")
        if len(encoded) > 0xFFFF:
            raise DataError(f"path longer than 65535 bytes: {path[:80]}...")
        offset, size = span if span is not None else (-1, -1)
        self._index_buffer.append(self._position + len(self._record_buffer))
        self._record_buffer += _RECORD.pack(offset, size, group, 0, len(encoded)) + encoded
        if self._buckets is not None:
            digest = int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little")
            self._buckets[digest % _DUPLICATE_BUCKETS].write(struct.pack("<Qq", digest, self.count))
        self.count += 1
        if len(self._record_buffer) >= _FLUSH_BYTES:
            self._flush()

    def finish(self, group_labels: list[int | None]) -> Listing:
        """Write what is buffered, flag duplicates, and return the listing."""
        self._flush()
        self._records.close()
        self._index.close()
        listing = Listing(self.base, self.count, group_labels)
        if self._buckets is not None:
            for bucket in self._buckets:
                bucket.close()
                _flag_duplicates(listing, Path(bucket.name))
                Path(bucket.name).unlink()
        return listing

    def abandon(self) -> None:
        """Close and delete everything written (after an error)."""
        for handle in [self._records, self._index, *(self._buckets or [])]:
            handle.close()
            Path(handle.name).unlink(missing_ok=True)

    def _flush(self) -> None:
        self._records.write(self._record_buffer)
        self._position += len(self._record_buffer)
        self._index.write(self._index_buffer.tobytes())
        self._record_buffer, self._index_buffer = bytearray(), array("q")


def _flag_duplicates(listing: Listing, bucket: Path) -> None:
    """Flag every item of `bucket` (hash, position pairs) whose path an earlier position has."""
    pairs = np.fromfile(bucket, dtype=np.dtype([("hash", "<u8"), ("position", "<i8")]))
    if len(pairs) < 2:
        return
    pairs.sort(order=("hash", "position"))
    repeated = np.flatnonzero(pairs["hash"][1:] == pairs["hash"][:-1]) + 1
    if not len(repeated):
        return
    index_fd, records_fd = listing._open()
    first_of_path: dict[tuple[int, str], int] = {}
    for row in np.unique(np.concatenate([repeated - 1, repeated])):
        digest, position = int(pairs["hash"][row]), int(pairs["position"][row])
        key = (digest, listing[position].path)  # equal hashes of different paths are not duplicates
        if key not in first_of_path:
            first_of_path[key] = position
            continue
        (offset,) = struct.unpack("<q", os.pread(index_fd, 8, 8 * position))
        flags_at = offset + _RECORD.size - 3
        flags = os.pread(records_fd, 1, flags_at)[0]
        write_fd = os.open(f"{listing.base}.records", os.O_WRONLY)
        try:
            os.pwrite(write_fd, bytes([flags | _DUPLICATE]), flags_at)
        finally:
            os.close(write_fd)


def listing_base(folder: Path) -> Path:
    """Where this process writes a listing in `folder`: named after the host and process, so that
    ranks sharing the folder do not collide; listings of dead processes on this host are removed."""
    host = socket.gethostname()
    for stale in Path(folder).glob(f"{_LISTING_PREFIX}{host}-*"):
        pid = stale.name[len(_LISTING_PREFIX) + len(host) + 1:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            stale.unlink(missing_ok=True)
    return Path(folder) / f"{_LISTING_PREFIX}{host}-{os.getpid()}"



def shuffled_positions(start: int, count: int, n: int, seed: int) -> np.ndarray:
    """Positions `start` .. `start + count - 1` of a seeded pseudo-random permutation of range(n).

    A 6-round Feistel network on the smallest even number of bits covering n,
    walked again while the result is n or more: a bijection of range(n)
    computed for any slice without the rest (no list of n positions anywhere).
    """
    if not 0 <= start <= start + count <= n:
        raise ValueError(f"positions {start}..{start + count - 1} are not all in range({n})")
    half = max(1, ((max(n, 2) - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64(int.from_bytes(hashlib.blake2b(f"{seed}:{r}".encode(), digest_size=8).digest(), "little"))
            for r in range(6)]
    values = np.arange(start, start + count, dtype=np.uint64)
    out = np.empty_like(values)
    todo = np.arange(count)
    while todo.size:
        walked = _feistel(values[todo], half, mask, keys)
        inside = walked < n
        out[todo[inside]] = walked[inside]
        values[todo[~inside]] = walked[~inside]
        todo = todo[~inside]
    return out.astype(np.int64)


def _feistel(values: np.ndarray, half: int, mask: np.uint64, keys: list[np.uint64]) -> np.ndarray:
    shift = np.uint64(half)
    left, right = values >> shift, values & mask
    for key in keys:
        mixed = (right ^ key) * np.uint64(0x9E3779B97F4A7C15)  # splitmix64-style mixing (wraps mod 2^64)
        mixed ^= mixed >> np.uint64(31)
        mixed *= np.uint64(0xBF58476D1CE4E5B9)
        mixed ^= mixed >> np.uint64(29)
        left, right = right, left ^ (mixed & mask)
    return (left << shift) | right

"""The shard format: webdataset tar shards (USTAR, fixed metadata) with a DALI index per shard, written shard
by shard under temp names, and their samples read back. prepare and export both write through it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from ..atomic import TEMP_MARK, write_text_atomic
from ..errors import DataError
from . import tars
from .manifest import ShardInfo

SHARD_NAME = "shard-{:06d}"
DALI_INDEX_VERSION = "v1.2"


@dataclass
class ShardSample:
    """One sample as stored: `<key>.<ext>` image bytes, `<key>.cls`, `<key>.json`."""

    key: str
    image: bytes
    ext: str
    label: int | None
    meta: dict[str, Any]


class ShardWriter:
    """Writes samples into numbered tar shards of `shard_size` samples, from `first_index` on.

    Each shard is written under a temp name and renamed, with its DALI index,
    only once complete. Use as a context manager: on error the open shard is
    deleted, so no partial shard ever carries a final name.
    """

    def __init__(self, out_dir: Path, shard_size: int, first_index: int = 0):
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.first_index = first_index  # number of the first shard written
        self.shards: list[ShardInfo] = []
        self._file: BinaryIO | None = None
        self._tmp: Path | None = None
        self._size = 0  # bytes written to the open shard
        self._sha256 = hashlib.sha256()
        self._count = 0
        self._index_lines: list[str] = []  # the DALI index of the open shard, built while writing

    def add(self, sample: ShardSample) -> None:
        """Append one sample, starting a new shard when the current one is full."""
        if len(sample.key) > 80:
            raise ValueError(f"shard keys are kept short so each header is one block: {sample.key!r}")
        if self._file is None:
            name = SHARD_NAME.format(self.first_index + len(self.shards)) + ".tar"
            self._tmp = self.out_dir / f".{name}{TEMP_MARK}{os.getpid()}"
            self._file = open(self._tmp, "wb")
            self._size, self._sha256 = 0, hashlib.sha256()
            self._count = 0
            self._index_lines = []
        entries, blobs, offset = [], [], self._size
        for name, data in sample_files(sample):
            # USTAR with fixed mtime and owner, as tarfile would write it: DALI has failed on
            # Python's default PAX headers (and webdataset 1.0.2's TarWriter writes those)
            blobs.append(tars.member_bytes(name, data))
            entries.append(f"{split_member_name(name)[1]} {offset + tars.BLOCK} {len(data)} {name}")
            offset += len(blobs[-1])
        self._write(b"".join(blobs))
        self._index_lines.append(" ".join(entries) + "\n")
        self._count += 1
        if self._count == self.shard_size:
            self._finish_shard()

    def close(self) -> list[ShardInfo]:
        """Finish the last shard and return every shard written."""
        if self._file is not None:
            self._finish_shard()
        return self.shards

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self._tmp is not None:  # a shard not renamed into place
            if self._file is not None:
                with contextlib.suppress(OSError):  # its flush may fail again (a full disk)
                    self._file.close()
                self._file = None
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha256.update(data)
        self._size += len(data)

    def _finish_shard(self) -> None:
        self._write(tars.archive_end(self._size))
        self._file.close()
        self._file = None
        base = SHARD_NAME.format(self.first_index + len(self.shards))
        tar_path, index_path = self.out_dir / f"{base}.tar", self.out_dir / f"{base}.idx"
        write_text_atomic(index_path, f"{DALI_INDEX_VERSION} {self._count}\n" + "".join(self._index_lines))
        os.replace(self._tmp, tar_path)
        self._tmp = None
        self.shards.append(ShardInfo(
            tar=tar_path.name, index=index_path.name, samples=self._count,
            bytes=self._size, sha256=self._sha256.hexdigest(),
        ))


def sample_files(sample: ShardSample) -> list[tuple[str, bytes]]:
    """The files a sample is stored as, (member name, bytes), in the order written: the image,
    `.cls` (when labelled) and `.json`, sorted by extension so a sample's files stay adjacent."""
    files = {sample.ext: sample.image, "json": json.dumps(sample.meta, sort_keys=True).encode()}
    if sample.label is not None:
        files["cls"] = str(sample.label).encode()
    return [(f"{sample.key}.{ext}", files[ext]) for ext in sorted(files)]


def split_member_name(name: str) -> tuple[str, str]:
    """(sample key, extension) of a shard member name: split at the first dot of its base
    name (the webdataset rule); the key is empty when there is no such dot or the file is hidden."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0 or name[:dot].endswith("/") or dot == 0:
        return "", name[dot + 1:] if dot >= 0 else ""
    return name[:dot], name[dot + 1:]


def sample_members(tar: tarfile.TarFile) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """Group a shard's files into samples: (key, members) for each run of adjacent files
    sharing the same key (see split_member_name)."""
    key, members = None, []
    for member in tar:
        if not member.isfile():
            continue
        base, _ = split_member_name(member.name)
        if not base:
            continue  # no extension, or a hidden file: not part of any sample
        if base != key and members:
            yield key, members
            members = []
        key = base
        members.append(member)
    if members:
        yield key, members


def member_extension(member: tarfile.TarInfo) -> str:
    """The extension of a shard member: everything after the first dot of its base name."""
    return split_member_name(member.name)[1]


def dali_index(tar_path: Path) -> str:
    """The DALI webdataset index (format v1.2, as DALI's wds2idx writes it) of a tar shard.

    One line per sample: `ext offset size name` for each of its files, where
    offset is the position of the file's data in the tar.
    """
    with tarfile.open(tar_path) as tar:
        lines = [
            " ".join(f"{member_extension(m)} {m.offset_data} {m.size} {m.name}" for m in members) + "\n"
            for _, members in sample_members(tar)
        ]
    if not lines:
        raise DataError(f"{tar_path}: empty shard")
    return f"{DALI_INDEX_VERSION} {len(lines)}\n" + "".join(lines)

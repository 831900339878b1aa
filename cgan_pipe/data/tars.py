"""Tar files at speed: list an archive's members, read one by offset, write USTAR shards."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Iterator

import numpy as np

from ..atomic import atomic_path
from ..errors import DataError

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # tarfile pads a closed archive to a multiple of this
_ZERO_BLOCK = bytes(BLOCK)
_CHECKSUM_BATCH = 16384  # headers checked per numpy call (8 MiB of them)
_READ_CHUNK = 1 << 16  # bytes read around a header: many headers of small members come in one read
_FILE_TYPES = (b"0", b"\x00", b"7")  # regular (and contiguous) files
_PLAIN_TYPES = _FILE_TYPES + (b"1", b"2", b"3", b"4", b"5", b"6")  # no extended header involved
_COMPRESSIONS = {"gzip": (b"\x1f\x8b", gzip.open), "bz2": (b"BZh", bz2.open), "xz": (b"\xfd7zXZ\x00", lzma.open)}


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One archive member: its name, where its data starts, its size, whether it is a regular file
    and whether a folder (neither: a link or a device)."""

    name: str
    offset: int
    size: int
    is_file: bool
    is_dir: bool


def compression_of(path: Path) -> str | None:
    """'gzip', 'bz2' or 'xz' when the file at `path` is compressed that way, else None."""
    with open(path, "rb") as handle:
        head = handle.read(6)
    return next((name for name, (magic, _) in _COMPRESSIONS.items() if head.startswith(magic)), None)


def decompress_to(path: Path, target: Path) -> None:
    """Stream the decompressed bytes of the compressed file `path` into `target` (written atomically)."""
    opener = _COMPRESSIONS[compression_of(path)][1]
    try:
        with opener(path, "rb") as src, atomic_path(target) as tmp, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataError(f"{path}: cannot decompress ({exc})") from None


def iter_members(path: Path) -> Iterator[TarEntry]:
    """The members of the uncompressed tar at `path`, in archive order, in constant memory.

    Plain USTAR/GNU headers are parsed directly (tarfile spends ~50 us per
    member), reading only around the headers and checking checksums a batch at
    a time. From the first header that needs more (PAX or GNU long-name
    extensions, base-256 sizes) or whose batch fails its checksum, tarfile
    takes over at that header and words any error.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise DataError(f"{path}: cannot read tar archive ({exc.strerror or exc})") from None
    try:
        handover = yield from _scan_plain(fd, os.fstat(fd).st_size)
    except OSError as exc:
        raise DataError(f"{path}: cannot read tar archive ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if handover is not None:
        yield from _iter_with_tarfile(path, handover)


def _scan_plain(fd: int, file_size: int) -> Generator[TarEntry, None, int | None]:
    """Yield the members of a tar while their headers are plain; return None at the end of the
    archive, or the position of the first header tarfile has to read."""
    batch: list[TarEntry] = []
    headers, stored = [], []  # the batch's headers, whose checksums are still to check, and their sums
    batch_start = chunk_start = pos = 0
    chunk = b""
    while True:
        if pos + BLOCK > file_size:
            handover = pos if pos < file_size else None  # a partial last block: tarfile says what is wrong
            break
        if not chunk_start <= pos <= chunk_start + len(chunk) - BLOCK:
            chunk_start, chunk = pos, os.pread(fd, _READ_CHUNK, pos)
        header = chunk[pos - chunk_start:pos - chunk_start + BLOCK]
        if header == _ZERO_BLOCK:
            handover = None
            break
        entry = _parse_plain(header, pos, file_size)
        if entry is None:
            handover = pos
            break
        batch.append(entry)
        headers.append(header)
        stored.append(int(header[148:156].rstrip(b"\x00 ") or b"-1", 8))
        pos = entry.offset + (-(-entry.size // BLOCK) * BLOCK if entry.is_file else 0)
        if len(batch) == _CHECKSUM_BATCH:
            if not _checksums_match(headers, stored):
                return batch_start
            yield from batch
            batch, headers, stored, batch_start = [], [], [], pos
    if batch and not _checksums_match(headers, stored):
        return batch_start
    yield from batch
    return handover


def _parse_plain(header: bytes, pos: int, file_size: int) -> TarEntry | None:
    """The member whose plain header is at `pos`; None when the header needs tarfile."""
    kind, size_field = header[156:157], header[124:136]
    if kind not in _PLAIN_TYPES or size_field[0] & 0x80:
        return None
    try:
        size = int(size_field.rstrip(b"\x00 ") or b"0", 8)
        int(header[148:156].rstrip(b"\x00 ") or b"-1", 8)
    except ValueError:
        return None
    # the rules of tarfile.TarInfo.frombuf: an old-style file named 'x/' is a directory,
    # directories lose trailing slashes, and a non-empty prefix field holds the leading folders
    name = header[:100].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
    is_dir = kind == b"5" or (kind == b"\x00" and name.endswith("/"))
    if is_dir:
        name = name.rstrip("/")
    if header[345]:
        name = header[345:500].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
    is_file = kind in _FILE_TYPES and not is_dir
    if is_file and pos + BLOCK + size > file_size:
        return None  # truncated: tarfile words the error
    return TarEntry(name, pos + BLOCK, size, is_file, is_dir)


def _checksums_match(headers: list[bytes], stored: list[int]) -> bool:
    """Whether each header's recorded checksum is the sum of its bytes, the checksum field read as spaces."""
    array = np.frombuffer(b"".join(headers), dtype=np.uint8).reshape(-1, BLOCK)
    computed = array.sum(axis=1, dtype=np.int64) - array[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    return bool(np.array_equal(computed, stored))


def _iter_with_tarfile(path: Path, start: int) -> Iterator[TarEntry]:
    """The members from the header at `start` on, read by tarfile (forgetting each once yielded)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            with tarfile.open(fileobj=handle, mode="r:") as tar:
                for member in iter(tar.next, None):
                    tar.members = []  # tarfile keeps every member it reads; none is needed again
                    yield TarEntry(member.name, member.offset_data, member.size, member.isfile(), member.isdir())
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read tar archive ({exc})") from None


def read_span(path: Path, offset: int, size: int) -> bytes:
    """`size` bytes of the file at `path` from `offset`, or DataError when the file is shorter."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise DataError(f"{path}: truncated: {size} bytes at offset {offset} were expected, {len(data)} are there")
    return data


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file, byte for byte what tarfile writes for
    `TarInfo(name)` with this size, mode 0644, mtime 0 and empty owner names."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    size_field = b"%011o\x00" % size
    checksum = _HEADER_TEMPLATE_SUM + sum(encoded) + sum(size_field)
    return b"".join((
        encoded.ljust(100, b"\x00"), _HEADER_MODE_IDS, size_field, _HEADER_MTIME, b"%06o\x00 " % checksum,
        _HEADER_TAIL,
    ))


_HEADER_MODE_IDS = b"0000644\x00" + b"0000000\x00" * 2  # mode, uid, gid
_HEADER_MTIME = b"00000000000\x00"
_HEADER_TAIL = b"0" + bytes(100) + tarfile.POSIX_MAGIC + bytes(32 + 32 + 8 + 8 + 155 + 12)
_HEADER_TEMPLATE_SUM = sum(_HEADER_MODE_IDS) + sum(_HEADER_MTIME) + 8 * 32 + sum(_HEADER_TAIL)


def member_bytes(name: str, data: bytes) -> bytes:
    """One regular file as it sits in a tar: its header, its data, zeros to the next block."""
    return ustar_header(name, len(data)) + data + _ZERO_BLOCK[:-len(data) % BLOCK]


def archive_end(size: int) -> bytes:
    """What ends an archive of `size` bytes as tarfile ends one: two zero blocks, then zeros
    up to a whole record."""
    end = size + 2 * BLOCK
    return bytes(2 * BLOCK + -end % RECORD)

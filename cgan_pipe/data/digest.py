"""The sha256 of a file's bytes, read in blocks: what manifests record per shard and uploads per object."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path: Path) -> list[int]:
    """What tells whether a file may have changed since it was hashed: its size and modification time, and its
    change time, inode and device, which a write in place moves even when the modification time is set back
    (os.utime sets the modification time, never the change time)."""
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]

"""Advisory locks on the folders a command writes (a run folder, a shard set being prepared, an export), so that
two processes never write one folder at once: the second stops at once, naming the first."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from .errors import BusyError

LOCK_NAME = ".cgan-pipe.lock"  # in the locked folder while it is held (and after its holder was killed)
_held: dict[Path, tuple[int, int]] = {}  # folders this process holds: path -> (file descriptor, holds)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold the lock of `folder` (created if missing) for the block; BusyError (exit 2) naming the holder's
    pid, host and command when another process holds it. Taken again by the same process, it nests.

    The lock is the kernel's (flock), so it ends with its process however that ends (kill -9 included)
    and is seen across the machines of a shared folder where the file system supports it (local disks,
    NFSv4)."""
    folder = Path(folder).absolute()
    if folder in _held:
        descriptor, holds = _held[folder]
        _held[folder] = descriptor, holds + 1
        try:
            yield
        finally:
            _release(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    descriptor = _lock_file(path)
    try:
        _describe_holder(descriptor)
    except BaseException:
        os.close(descriptor)
        raise
    _held[folder] = descriptor, 1
    try:
        yield
    finally:
        _release(folder)


def _lock_file(path: Path) -> int:
    """Open and lock the file `path` (created if missing): its descriptor. A holder removes the file as it
    releases it, so a lock taken on a file that is no longer at `path` is let go and taken again."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(descriptor, path):
                return descriptor
        except BlockingIOError:
            os.close(descriptor)
            raise BusyError(f"{path.parent} is being written by another cgan-pipe process ({_holder(path)}); wait "
                            f"for it to finish (or stop it), then rerun") from None
        except BaseException:
            os.close(descriptor)
            raise
        os.close(descriptor)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        return False


def _release(folder: Path) -> None:
    descriptor, holds = _held[folder]
    if holds > 1:
        _held[folder] = descriptor, holds - 1
        return
    del _held[folder]
    try:
        (folder / LOCK_NAME).unlink(missing_ok=True)  # while still locked: see _lock_file
    except OSError:
        pass  # a folder made read-only meanwhile: the file stays, unlocked
    os.close(descriptor)  # closing the file releases the lock


def _describe_holder(descriptor: int) -> None:
    """Write who holds the lock into its file, for the message of a process that finds it taken."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(["cgan-pipe", *sys.argv[1:]])[:300]}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(record).encode(), 0)


def _holder(path: Path) -> str:
    """Who holds the lock in `path`, as its holder recorded it."""
    try:
        record = json.loads(path.read_text())
        return f"pid {record['pid']} on {record['host']}, `{record['command']}` since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"

"""Atomic file writes: write to a temp name beside the target, rename when complete; clear killed writers' temps."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from .errors import DataError

TEMP_MARK = ".tmp-"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # the errnos of a full disk or an exhausted quota


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it is renamed to `path`, on error removed.

    A reader (or a rerun) therefore sees either the old file or the complete new one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, as UTF-8; a name that was not UTF-8 where it came from (a lone
    surrogate, as Python reads such bytes) is written as its escape (\\udce9) rather than failing."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files that writers killed mid-write left in `folder` (those whose process is
    gone; the folder must not be written from other machines); returns what was deleted."""
    removed = []
    for path in Path(folder).glob(f".*{TEMP_MARK}*"):
        pid = path.name.rpartition(TEMP_MARK)[2]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


@contextlib.contextmanager
def disk_full_explained(where: Path, kept: str) -> Iterator[None]:
    """Turn a full disk (or quota) met in the block into a DataError naming the file, saying what was
    `kept` and how to go on."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise DataError(_no_space(exc.filename or where, kept)) from None


def _no_space(where: Path | str, kept: str) -> str:
    return f"{where}: no space left on the device; {kept}: free some space and rerun the same command to resume"


# What to do about a file system error, by errno, for the errors a user can act on.
_REMEDIES = {
    errno.EROFS: "the file system is read-only: choose a folder on a writable one",
    errno.EACCES: "permission denied: choose a folder you may write (and read), or change its permissions",
    errno.EPERM: "not permitted: choose a folder you may write, or change its permissions",
    errno.ENOTDIR: "a file is where a folder is needed: choose another path",
    errno.EISDIR: "a folder is where a file is needed: choose another path",
    errno.EEXIST: "it exists already as another kind of file: choose another path",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter path",
    errno.ENOENT: "no such file or folder",
}


def os_error_message(exc: OSError) -> str:
    """One line for a file system error: the path(s) it names, what went wrong, and what to do."""
    if exc.errno in DISK_FULL:
        return _no_space(exc.filename or "writing", "finished work is kept")
    paths = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
    what = _REMEDIES.get(exc.errno) or exc.strerror or str(exc)
    return f"{paths}: {what}" if paths else f"{what} ({exc})"

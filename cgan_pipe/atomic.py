"""Atomic file writes: write to a temp name beside the target, rename when complete."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

TEMP_MARK = ".tmp-"


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
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)

"""Checkpoints: one file per save, written atomically, loaded with weights_only=True."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..errors import DataError

KIND = "cgan-pipe-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{7})\.pt$")


def checkpoint_path(directory: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives."""
    return Path(directory) / f"ckpt-{step:07d}.pt"


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` (state dicts, config, RNG, ...) for `step`; keep only the newest `keep` files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    with atomic_path(path) as tmp:
        try:
            torch.save({"kind": KIND, "version": VERSION, "step": step, **state}, tmp)
        except RuntimeError as exc:  # torch's zip writer words a failed write (a full disk) this way
            raise DataError(f"{path}: could not write the checkpoint ({str(exc).splitlines()[0]}); is the disk "
                            f"full? The checkpoints before it are kept: free some space and rerun the same "
                            f"command to resume") from None
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink()
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first (temp files are never listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain data only; no code runs).

    Raises DataError naming the file when it is missing, unreadable or not ours.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):  # what torch.save writes
            raise DataError(f"{path}: not a checkpoint (not a file written by torch.save)") from None
        raise DataError(f"{path}: refused to load: it holds objects other than tensors and plain data, which could "
                        f"run code; cgan-pipe checkpoints never do") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise DataError(f"{path}: not a cgan-pipe checkpoint")
    if state.get("version") != VERSION:
        raise DataError(f"{path}: checkpoint version {state.get('version')!r}, this cgan-pipe reads {VERSION}")
    return state

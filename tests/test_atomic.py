"""Atomic writes: a failed write leaves neither a temp file nor a half-written target; killed writers'
temps are cleared."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cgan_pipe.atomic import TEMP_MARK, atomic_path, remove_stale_temps, write_text_atomic


def test_success_renames_into_place(tmp_path):
    write_text_atomic(tmp_path / "a.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_temps_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".ckpt-0000016.pt{TEMP_MARK}{finished.stdout.strip()}"
    mine = tmp_path / f".ckpt-0000020.pt{TEMP_MARK}{os.getpid()}"
    alive = tmp_path / f".grid.png{TEMP_MARK}1"  # init is always alive
    other = tmp_path / "ckpt-0000012.pt"
    for path in (dead, mine, alive, other):
        path.write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (mine, alive, other))

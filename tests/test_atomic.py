"""Atomic writes: a failed write leaves neither a temp file nor a half-written target."""

from __future__ import annotations

import pytest

from cgan_pipe.atomic import atomic_path, write_text_atomic


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

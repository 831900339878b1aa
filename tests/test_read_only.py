"""Read-only places and paths that are not what a command needs: one line naming the path and what to do, exit 1
(or 2 for an argument), never a traceback, and nothing written."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import UNSHARE, can_mount

CLI = str(Path(sys.executable).with_name("cgan-pipe"))


def _in_read_only(folder: Path, command: list[str], bind: Path | None = None) -> subprocess.CompletedProcess:
    """Run `command` with `folder` a read-only file system: an empty tmpfs, or `bind` mounted read-only."""
    folder.mkdir(exist_ok=True)
    mount = (f"mount --bind {shlex.quote(str(bind))} {shlex.quote(str(folder))} && "
             f"mount -o remount,ro,bind {shlex.quote(str(folder))}") if bind else \
        f"mount -t tmpfs -o ro,size=1m tmpfs {shlex.quote(str(folder))}"
    return subprocess.run([*UNSHARE, "sh", "-c", f"{mount} && exec {' '.join(map(shlex.quote, command))}"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not can_mount(), reason="needs unprivileged user namespaces to mount a read-only file system "
                    "(unshare --user --map-root-user --mount)")
def test_commands_writing_into_a_read_only_folder_say_so_in_one_line(small_tar, small_shards, checkpoint, tmp_path):
    ro = tmp_path / "ro"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "ro", "run_dir": str(ro / "run"), "data": {"source": "unused"},
        "loader": {"threads": 1, "shards": str(small_shards)}, "eval": {"metrics": []},
        "model": {"g_width": 32, "d_width": 32}, "train": {"steps": 2, "batch_size": 16, "device": "cpu"},
    }))
    for command, named in [
        ([CLI, "prepare", str(small_tar), str(ro / "shards")], ro / "shards"),
        ([CLI, "train", str(pipeline)], ro / "run"),
        ([CLI, "generate", str(checkpoint), str(ro / "out"), "--n", "4"], ro / "out"),
    ]:
        result = _in_read_only(ro, command)
        assert result.returncode == 1, (command, result.stderr)
        assert f"error: {named}: the file system is read-only: choose a folder on a writable one" in result.stderr
        assert "Traceback" not in result.stderr, result.stderr
    sheet = small_shards / "contact-sheet.png"
    result = _in_read_only(ro, [CLI, "inspect", str(ro)], bind=small_shards)  # writes its sheet beside the shards
    assert result.returncode == 1 and f"error: {ro}/" in result.stderr and "read-only" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not sheet.exists()


def test_a_file_where_an_output_folder_goes_is_refused_before_any_work(small_tar, checkpoint, tmp_path):
    (tmp_path / "a-file").write_text("the user's")
    for command in ([CLI, "prepare", str(small_tar), str(tmp_path / "a-file")],
                    [CLI, "generate", str(checkpoint), str(tmp_path / "a-file"), "--n", "2"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "is a file; give a folder (a new one is made)" in result.stderr, result.stderr
    assert (tmp_path / "a-file").read_text() == "the user's"
    (tmp_path / "dir").mkdir()
    result = subprocess.run([CLI, "prepare", str(small_tar), str(tmp_path / "a-file" / "below")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and f"{tmp_path / 'a-file'}" in result.stderr and "Traceback" not in result.stderr


def test_generate_into_the_current_folder(checkpoint, tmp_path):
    result = subprocess.run([CLI, "generate", str(checkpoint), ".", "--n", "4"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["contact-sheet.png", "export.json", "files", "shards"]
    (tmp_path / "notes.txt").write_text("the user's")
    again = subprocess.run([CLI, "generate", str(checkpoint), ".", "--n", "5"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert again.returncode == 2 and "holds files cgan-pipe did not write (notes.txt)" in again.stderr

"""Folder locks: a second process writing a folder that one is writing stops at once, naming the first; a lock
ends with its holder, however that ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cgan_pipe.errors import BusyError
from cgan_pipe.lock import LOCK_NAME, folder_lock

CLI = str(Path(sys.executable).with_name("cgan-pipe"))


def _hold(folder: Path) -> subprocess.Popen:
    """Another process holding the lock of `folder` until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from cgan_pipe.lock import folder_lock
with folder_lock({str(folder)!r}):
    print("held", flush=True)
    time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_lets_go(tmp_path):
    holder = _hold(tmp_path / "run")
    try:
        with pytest.raises(BusyError, match=rf"run is being written by another cgan-pipe process \(pid {holder.pid} "
                                            rf"on {socket.gethostname()}, .* since .*\); wait for it to finish"):
            with folder_lock(tmp_path / "run"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with folder_lock(tmp_path / "run"):  # the kernel let go of the dead holder's lock
        assert (tmp_path / "run" / LOCK_NAME).exists()
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released and removed: the folder is left as it was


def test_the_same_process_may_take_a_lock_it_holds(tmp_path):
    with folder_lock(tmp_path):
        with folder_lock(tmp_path):
            pass
        with pytest.raises(subprocess.CalledProcessError):  # still held by this process after the inner block
            subprocess.run([sys.executable, "-c", f"from cgan_pipe.lock import folder_lock\n"
                            f"with folder_lock({str(tmp_path)!r}): pass"], check=True, capture_output=True)
    assert sorted(os.listdir(tmp_path)) == []


def _pipeline(tmp_path: Path, shards: Path, steps: int) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "name": "busy", "run_dir": str(tmp_path / "run"), "data": {"source": "unused"},
        "loader": {"threads": 1, "shards": str(shards)}, "eval": {"metrics": []},
        "model": {"z_dim": 16, "g_width": 32, "d_width": 32},
        "train": {"steps": steps, "batch_size": 16, "log_every": 1, "checkpoint_every": 10, "device": "cpu"},
    }))
    return path


def test_two_trainings_of_one_run_folder_cannot_run_at_once(small_shards, tmp_path):
    first = subprocess.Popen([CLI, "train", str(_pipeline(tmp_path, small_shards, 100_000)), "-q"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        second = subprocess.run([CLI, "train", str(tmp_path / "p.yaml"), "-q"], capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"is being written by another cgan-pipe process (pid {first.pid} on {socket.gethostname()}, " \
               f"`cgan-pipe train" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    steps = [yaml.safe_load(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one training's rows, each step once


def test_every_command_that_writes_a_folder_takes_its_lock(small_tar, small_shards, checkpoint, tmp_path):
    pipeline = _pipeline(tmp_path, small_shards, 2)
    run_dir, out = tmp_path / "run", tmp_path / "out"
    for folder, command in [
        (run_dir, ["train", str(pipeline)]),
        (run_dir, ["run", str(pipeline), "--only", "train"]),
        (out, ["prepare", str(small_tar), str(out)]),
        (out, ["generate", str(checkpoint), str(out), "--n", "4"]),
    ]:
        holder = _hold(folder)
        try:
            result = subprocess.run([CLI, *command], capture_output=True, text=True, timeout=300)
        finally:
            holder.kill()
            holder.wait()
        assert result.returncode == 2 and f"(pid {holder.pid} on" in result.stderr, (command, result.stderr)
        assert sorted(os.listdir(folder)) == [LOCK_NAME], command  # nothing written beside the holder's lock
        (folder / LOCK_NAME).unlink()

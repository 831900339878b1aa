"""Processes started through cgan_pipe.processes end within seconds of their parent's kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from cgan_pipe.config import DataConfig, to_dict
from cgan_pipe.data.shards import prepare

from conftest import small_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def session_processes(session: int) -> list[int]:
    """Live (not zombie) processes of the session `session`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(entry))
    return found


def kill_and_count_survivors(command: list[str], ready: int, cwd: Path | None = None, timeout: float = 240,
                             grace: float = 10, ready_file: Path | None = None) -> tuple[int, list[int]]:
    """Start `command` in a session of its own; once `ready` processes run in it (and `ready_file`, if given,
    exists), SIGKILL the first; return (how many processes the session had, those still alive `grace`
    seconds later, which are then killed so that a failing test leaves nothing behind)."""
    process = subprocess.Popen(command, cwd=cwd, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    seen = session_processes(process.pid)
    while ((len(seen) < ready or (ready_file and not ready_file.exists())) and process.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.02)
        seen = session_processes(process.pid)
    if process.poll() is not None:
        pytest.fail(f"{command[:3]} ended before {ready} processes ran: {process.stderr.read().decode()[-2000:]}")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    end = time.monotonic() + grace
    while session_processes(process.pid) and time.monotonic() < end:
        time.sleep(0.1)
    survivors = session_processes(process.pid)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    return len(seen), survivors


def python_child(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_a_pool_worker_ends_with_its_parent():
    count, survivors = kill_and_count_survivors(python_child("""
        import time
        from cgan_pipe.processes import process_pool
        with process_pool(2) as pool:
            list(pool.map(abs, range(4)))  # both workers up (and the resource tracker)
            time.sleep(600)
    """), ready=3)
    assert count >= 3 and survivors == []


def test_a_command_run_tied_ends_with_its_parent():
    count, survivors = kill_and_count_survivors(python_child("""
        from cgan_pipe.processes import run_tied
        run_tied(["sleep", "600"])
    """), ready=2)
    assert count == 2 and survivors == []


def test_without_the_tie_the_same_pool_outlives_its_parent(tmp_path):
    """The check can fail: a plain spawned pool stays behind after its parent's kill -9 (once its worker has
    started: one killed while still reading its start-up data from the parent exits with it)."""
    started = tmp_path / "started"
    count, survivors = kill_and_count_survivors(python_child(f"""
        import multiprocessing, pathlib, time
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(abs, 1).result()
            pathlib.Path({str(started)!r}).touch()
            time.sleep(600)
    """), ready=3, grace=3, ready_file=started)
    assert len(survivors) == 2  # the worker and the resource tracker, killed by the helper


def test_a_child_whose_parent_is_already_gone_exits_at_once():
    result = subprocess.run(python_child(f"""
        from cgan_pipe.processes import end_with_parent
        end_with_parent({os.getpid() + 10**6})  # not its parent
        print("still here")
    """), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "still here" not in result.stdout


# Each command that starts processes, killed mid-work.

CLI = str(Path(sys.executable).with_name("cgan-pipe"))


@pytest.fixture(scope="module")
def shards(cifar_tar, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shards"
    prepare(DataConfig(str(cifar_tar), shard_size=100, resolution=64, format="png", workers=1), out, progress=False)
    return out


def test_prepare_leaves_no_worker_behind(cifar_tar, tmp_path):
    # parent, resource tracker, two pool workers
    count, survivors = kill_and_count_survivors(
        [CLI, "prepare", str(cifar_tar), str(tmp_path / "out"), "--workers", "2", "--resolution", "256",
         "--format", "png", "--shard-size", "50", "-q"], ready=4)
    assert count == 4 and survivors == []


def test_verify_leaves_no_decoder_process_behind(shards):
    # parent, resource tracker, DALI's decoder process
    count, survivors = kill_and_count_survivors([CLI, "verify", str(shards), "-q"], ready=3)
    assert count == 3 and survivors == []


def test_train_leaves_no_dataloader_worker_behind(shards, tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(to_dict(small_config(
        tmp_path / "run", {"loader": {"backend": "torch", "threads": 2, "shards": str(shards)}}, steps=100000))))
    # parent, two DataLoader workers
    count, survivors = kill_and_count_survivors([CLI, "train", str(config), "-q"], ready=3, grace=3)
    assert count == 3 and survivors == []


def test_bench_loader_leaves_no_dataloader_worker_behind(shards):
    count, survivors = kill_and_count_survivors(
        [CLI, "bench", "loader", str(shards), "--backends", "baseline", "--workers", "2", "--batches", "100000",
         "--batch-size", "16"], ready=3, grace=3)
    assert count == 3 and survivors == []


def test_a_process_that_exits_with_dataloader_workers_alive_ends(small_shards):
    # DataLoader workers ignore SIGTERM (so that training stops cleanly); multiprocessing's exit handler
    # sends them SIGTERM and then waits for them, which waited forever before cgan-pipe killed them first.
    leaves_workers = textwrap.dedent(f"""
        import torch
        from cgan_pipe.config import LoaderConfig
        from cgan_pipe.data.loader import open_loader

        batches = iter(open_loader({str(small_shards)!r}, LoaderConfig(backend="torch", threads=2), 16, 0,
                                   torch.device("cpu")))
        next(batches)  # two workers running, and the iterator never closed
        print("exiting", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", leaves_workers], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "exiting\n", done.stderr

"""Child processes that end with the process that started them, however it ends (kill -9 included)."""

from __future__ import annotations

import atexit
import ctypes
import functools
import multiprocessing
import multiprocessing.util  # its exit handler, registered on import, must run after ours (below)
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_WATCH_SECONDS = 0.5  # how often a child polls its parent where the kernel cannot signal it


def end_with_parent(parent_pid: int) -> None:
    """Make this process exit as soon as the process `parent_pid` (its parent) is gone.

    A process killed with SIGKILL cannot stop its children, and a child blocked
    on a pipe its parent's other children keep open never sees end-of-file: it
    would live on, holding its memory, until reboot. On Linux the kernel sends
    this process SIGKILL when the thread that started it exits
    (PR_SET_PDEATHSIG); elsewhere a daemon thread polls the parent's pid.
    """
    if sys.platform.startswith("linux"):
        _kill_me_when_parent_exits()
    else:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)


@functools.cache
def _prctl() -> Callable[..., int]:
    return ctypes.CDLL(None, use_errno=True).prctl


def _kill_me_when_parent_exits() -> None:
    if _prctl()(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        threading.Event().wait(_WATCH_SECONDS)
    os._exit(1)


def child_initializer(then: Callable[..., Any] | None = None, *args: Any) -> Callable[..., None]:
    """A picklable initializer for worker processes (a pool's `initializer`, a DataLoader's
    `worker_init_fn`) that ties each worker's life to this process, then calls `then(*args, ...)`."""
    return functools.partial(_init_child, os.getpid(), then, args)


def _init_child(parent_pid: int, then: Callable[..., Any] | None, args: tuple, *more: Any) -> None:
    end_with_parent(parent_pid)
    if then is not None:
        then(*args, *more)


def process_pool(workers: int, initializer: Callable[..., Any] | None = None, *args: Any) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes that end with this one; each runs `initializer(*args)` first.

    Spawned, not forked: this process may hold torch or DALI threads. Call it,
    and submit work, from a thread that outlives the pool (on Linux a worker
    ends with the thread that started it).
    """
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=child_initializer(initializer, *args))


def run_tied(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run(command, **kwargs)` with the command ending if this process is killed."""
    if sys.platform.startswith("linux"):
        _prctl()  # looked up here: the forked child, between fork and exec, only calls it
        return subprocess.run(command, preexec_fn=_kill_me_when_parent_exits, **kwargs)
    return subprocess.run(command, **kwargs)


def _kill_daemonic_children() -> None:
    """At exit, kill this process's daemonic children still alive: DataLoader workers, which ignore SIGTERM
    (`interrupts.ignore_stop_signals`), would outlive multiprocessing's own exit handler, which sends them
    SIGTERM and then waits for them. Registered after that handler, so it runs before it."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_daemonic_children)

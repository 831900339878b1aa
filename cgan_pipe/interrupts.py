"""SIGINT and SIGTERM (what a terminal, a cluster scheduler or a preempted machine sends): an Interrupted error
that unwinds a command as Ctrl-C does, or, where work can end cleanly (a training step), a request it reads."""

from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Iterator

from .errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_interrupted(signal_number: int, frame: FrameType | None) -> None:
    raise Interrupted(signal_number)


@contextlib.contextmanager
def terminations_interrupt() -> Iterator[None]:
    """For the block, SIGTERM raises Interrupted where the program is, as SIGINT raises KeyboardInterrupt, so
    that temp files are removed and a message is printed instead of the process vanishing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequest:
    """The first SIGINT or SIGTERM received in a `stop_requests` block (None until then)."""

    signal: int | None = None


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """For the block, the first SIGINT or SIGTERM is recorded in the yielded StopRequest instead of ending the
    work, which ends cleanly when it reads it; a second acts as usual (KeyboardInterrupt, Interrupted), for a
    user who will not wait."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}

    def record(signal_number: int, frame: FrameType | None) -> None:
        request.signal = signal_number
        for number, handler in previous.items():
            signal.signal(number, handler)

    for number in STOP_SIGNALS:
        signal.signal(number, record)
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def ignore_stop_signals(*_: object) -> None:
    """In a worker process (a DataLoader's): leave SIGINT and SIGTERM to the parent, which stops the work
    cleanly and then ends the worker, instead of dying under it mid-batch."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)

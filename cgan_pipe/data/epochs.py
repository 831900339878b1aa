"""Where a loader's pass over the data stands: each epoch's seeded shard order per stream, the mark each
batch carries, and the position a checkpoint records so that a resumed run goes on within its epoch."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from .manifest import ShardInfo


def epoch_shards(shards: list[ShardInfo], seed: int, epoch: int, stream: int, streams: int) -> list[ShardInfo]:
    """The shards `stream` (of `streams`: one for DALI, one per DataLoader worker) reads in `epoch`, in
    order: a shuffle of `shards` seeded by (seed, epoch), dealt out to the streams in turn."""
    order = list(shards)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[stream::streams]


def where_to_start(start: LoaderPosition | None, shards: list[ShardInfo], seed: int, streams: int
                   ) -> LoaderPosition | None:
    """`start`, or the start of the next epoch when no stream has a shard of `start`'s epoch left to read
    (a loader whose shuffle buffer had taken them all when the position was recorded)."""
    if start is None:
        return None
    left = sum(max(0, len(epoch_shards(shards, seed, start.epoch, stream, streams)) - start.skipped(stream, streams))
               for stream in range(streams))
    return start if left > 0 else LoaderPosition(start.epoch + 1, (0,) * streams)


@dataclass(frozen=True)
class EpochMark:
    """What a batch says of where its stream stood when the batch was made: the epoch, the stream, and how
    many of the stream's shards of that epoch it had started. Every sample of the batch, and of the stream's
    batches before it in the epoch, came from those shards."""

    epoch: int
    stream: int
    started: int


@dataclass(frozen=True)
class LoaderPosition:
    """A loader's place in its data: the epoch, and for each stream the shards of that epoch it had started
    by the last batch handed over. A loader opened at a position reads each stream's remaining shards of
    that epoch, then whole epochs."""

    epoch: int
    started: tuple[int, ...]

    @classmethod
    def first(cls, streams: int) -> LoaderPosition:
        """The start of the first epoch."""
        return cls(0, (0,) * streams)

    def after(self, mark: EpochMark) -> LoaderPosition:
        """This position once a batch with `mark` has been handed over."""
        if mark.epoch > self.epoch:
            started = [0] * len(self.started)
        elif mark.epoch < self.epoch:
            return self  # a stream's last batch of the epoch before, arriving late
        else:
            started = list(self.started)
        started[mark.stream] = max(started[mark.stream], mark.started)
        return LoaderPosition(mark.epoch, tuple(started))

    def skipped(self, stream: int, streams: int) -> int:
        """Shards `stream` (of `streams`) skips at the start of `epoch`: none when the position was recorded
        with another number of streams (the epoch is then read again from its start)."""
        return self.started[stream] if len(self.started) == streams else 0

    def to_dict(self) -> dict[str, Any]:
        """As a checkpoint stores it."""
        return {"epoch": self.epoch, "started": list(self.started)}

    @classmethod
    def from_dict(cls, data: Any) -> LoaderPosition | None:
        """The position a checkpoint stored, or None for none (an older checkpoint) or a malformed one."""
        try:
            position = cls(int(data["epoch"]), tuple(int(n) for n in data["started"]))
        except (TypeError, KeyError, ValueError):
            return None
        return position if position.epoch >= 0 and all(n >= 0 for n in position.started) else None

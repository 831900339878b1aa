"""Where a loader's epoch stands: the seeded shard order per stream, positions from batch marks, resuming."""

from __future__ import annotations

from cgan_pipe.data.epochs import EpochMark, LoaderPosition, epoch_shards, where_to_start
from cgan_pipe.data.manifest import ShardInfo

SHARDS = [ShardInfo(f"shard-{i:06d}.tar", f"shard-{i:06d}.idx", 10, 100, "0" * 64) for i in range(10)]


def test_each_epoch_deals_a_seeded_shuffle_of_every_shard_to_the_streams():
    streams = [epoch_shards(SHARDS, 3, 0, stream, 3) for stream in range(3)]
    assert sorted(s.tar for part in streams for s in part) == [s.tar for s in SHARDS]  # each once
    assert [len(part) for part in streams] == [4, 3, 3]
    assert epoch_shards(SHARDS, 3, 0, 1, 3) == streams[1]  # the same seed and epoch: the same order
    assert epoch_shards(SHARDS, 3, 1, 0, 1) != epoch_shards(SHARDS, 3, 0, 0, 1)  # each epoch its own
    assert epoch_shards(SHARDS, 4, 0, 0, 1) != epoch_shards(SHARDS, 3, 0, 0, 1)


def test_a_position_follows_the_marks_of_the_batches_handed_over():
    position = LoaderPosition.first(2)
    for mark in (EpochMark(0, 0, 1), EpochMark(0, 1, 2), EpochMark(0, 0, 3), EpochMark(0, 1, 2)):
        position = position.after(mark)
    assert position == LoaderPosition(0, (3, 2))
    position = position.after(EpochMark(1, 1, 1))  # a new epoch starts the counts again
    assert position == LoaderPosition(1, (0, 1))
    assert position.after(EpochMark(0, 0, 5)) == position  # a late batch of the epoch before changes nothing


def test_a_position_is_stored_and_read_back_and_a_malformed_one_is_none():
    position = LoaderPosition(4, (2, 0, 7))
    assert LoaderPosition.from_dict(position.to_dict()) == position
    for bad in (None, {}, {"epoch": -1, "started": []}, {"epoch": 1, "started": ["x"]}, {"epoch": 1}, []):
        assert LoaderPosition.from_dict(bad) is None


def test_a_stream_skips_what_it_started_unless_the_streams_changed():
    position = LoaderPosition(2, (3, 1))
    assert position.skipped(0, 2) == 3 and position.skipped(1, 2) == 1
    assert position.skipped(0, 4) == 0  # recorded with 2 streams, opened with 4: the epoch again from its start


def test_a_position_with_nothing_left_in_its_epoch_starts_the_next():
    assert where_to_start(None, SHARDS, 0, 1) is None
    assert where_to_start(LoaderPosition(2, (9,)), SHARDS, 0, 1) == LoaderPosition(2, (9,))
    assert where_to_start(LoaderPosition(2, (10,)), SHARDS, 0, 1) == LoaderPosition(3, (0,))
    assert where_to_start(LoaderPosition(2, (5, 5)), SHARDS, 0, 2) == LoaderPosition(3, (0, 0))
    assert where_to_start(LoaderPosition(2, (5, 4)), SHARDS, 0, 2) == LoaderPosition(2, (5, 4))

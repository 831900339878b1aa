"""Listings on disk and the seeded order: a true permutation, computed slice by slice."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cgan_pipe.data.listing import ListingWriter, listing_base, shuffled_positions
from cgan_pipe.config import DataConfig
from cgan_pipe.data.shards import prepare

from conftest import cifar_members


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1000, 4097])
def test_the_seeded_order_is_a_permutation(n):
    order = shuffled_positions(0, n, n, seed=7)
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(order, shuffled_positions(0, n, n, seed=7))


def test_slices_of_the_order_agree_with_the_whole_and_seeds_differ():
    whole = shuffled_positions(0, 5000, 5000, seed=1)
    parts = np.concatenate([shuffled_positions(start, min(700, 5000 - start), 5000, seed=1)
                            for start in range(0, 5000, 700)])
    assert np.array_equal(whole, parts)
    other = shuffled_positions(0, 5000, 5000, seed=2)
    assert not np.array_equal(whole, other)
    # a shuffle, not a shift: neighbours end up far apart
    assert np.abs(np.diff(whole)).mean() > 1000


def test_a_listing_reads_back_what_was_written_and_flags_repeated_paths(tmp_path):
    writer = ListingWriter(listing_base(tmp_path), find_duplicates=True)
    entries = [("cat/a.jpg", 0, (512, 100)), ("dog/ü.jpg", 1, None), ("cat/a.jpg", 0, (2048, 7)),
               ("x" * 600 + ".jpg", 1, None)]
    for path, group, span in entries:
        writer.add(path, group, span)
    listing = writer.finish([3, None])
    assert len(listing) == 4
    assert [tuple(item) for item in listing] == [("cat/a.jpg", 3, (512, 100)), ("dog/ü.jpg", None, None),
                                                 ("cat/a.jpg", 3, (2048, 7)), ("x" * 600 + ".jpg", None, None)]
    assert [listing.entry(i)[1] for i in range(4)] == [False, False, True, False]  # the first copy is used
    copy = pickle.loads(pickle.dumps(listing))  # what a worker gets: no open files, reads the same
    assert copy[2] == listing[2]
    listing.remove()
    assert list(tmp_path.iterdir()) == []


def test_a_path_listed_twice_is_prepared_once(tmp_path):
    members = cifar_members("test", 1)
    for name, data in members.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    first = next(iter(members))
    (tmp_path / "list.txt").write_text("\n".join([*members, first]) + "\n")
    manifest, _ = prepare(DataConfig(str(tmp_path / "list.txt")), tmp_path / "out", progress=False)
    assert manifest.num_samples == 10
    assert manifest.skipped == [{"source": first, "kind": "duplicate name",
                                 "reason": "duplicate name: the first copy is used"}]
    assert not list((tmp_path / "out").glob(".listing-*"))

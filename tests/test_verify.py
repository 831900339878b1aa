"""verify: a sound shard set passes; corrupt images, wrong sizes, bad labels and edits are named."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from cgan_pipe.data.manifest import Manifest, write_manifest
from cgan_pipe.data.shard_format import ShardSample, ShardWriter
from cgan_pipe.data.verify import contact_sheet, inspect_shards, verify_shards
from cgan_pipe.errors import DataError

from conftest import CLASSES, cifar_members


def test_sound_shards_pass(small_shards):
    report = verify_shards(small_shards)
    assert report.ok and report.shards == 2 and report.samples == 200


def _broken_set(directory):
    good = list(cifar_members("test", 1).values())
    small = io.BytesIO()
    Image.open(io.BytesIO(good[0])).resize((16, 16)).save(small, "JPEG")
    images = [good[0], good[1], good[2][:200], good[3], b"hello, world", small.getvalue(), good[4]]
    labels = [0, 1, 2, 3, 4, 5, 42]
    with ShardWriter(directory, shard_size=4) as writer:
        for i, (data, label) in enumerate(zip(images, labels)):
            writer.add(ShardSample(f"{i:08d}", data, "jpg", label, {"source": f"x/{i}.jpg"}))
        shards = writer.close()
    write_manifest(directory, Manifest("prepare", "test", {}, 32, "jpeg", CLASSES, shards))


def test_every_bad_sample_is_named_by_shard_and_key(tmp_path):
    _broken_set(tmp_path)
    report = verify_shards(tmp_path)
    assert not report.ok and report.samples == 7
    found = {(p.shard, p.key): p.problem for p in report.problems}
    assert set(found) == {("shard-000000.tar", "00000002"), ("shard-000001.tar", "00000004"),
                          ("shard-000001.tar", "00000005"), ("shard-000001.tar", "00000006")}
    assert found[("shard-000000.tar", "00000002")].startswith("DALI c")  # cannot decode it, or crashed on it
    assert found[("shard-000001.tar", "00000004")].startswith("DALI c")
    assert "decoded shape (16, 16, 3)" in found[("shard-000001.tar", "00000005")]
    assert "bad class id b'42'" in found[("shard-000001.tar", "00000006")]


def test_a_shard_edited_after_writing_fails_its_checksum(small_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_shards, copy)
    with open(copy / "shard-000001.tar", "r+b") as handle:
        handle.seek(2000)
        byte = handle.read(1)
        handle.seek(2000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    problems = [(p.shard, p.key, p.problem) for p in verify_shards(copy).problems]
    assert ("shard-000001.tar", None, "sha256 differs from the manifest (the shard changed after it was written)") \
        in problems


def test_no_manifest_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        verify_shards(tmp_path)


def test_inspect_reports_counts_histograms_and_sizes(small_shards):
    info = inspect_shards(small_shards)
    assert info["samples"] == 200 and info["shards"] == 2 and info["resolution"] == 32
    assert info["class_histogram"] == {c: 20 for c in CLASSES} and info["quality_histogram"] == {"75": 200}
    originals = cifar_members("test", 20)
    assert info["bytes_per_image"] == pytest.approx(sum(map(len, originals.values())) / 200, abs=0.1)


def test_contact_sheet_has_a_row_per_class(small_shards, tmp_path):
    path = contact_sheet(small_shards, tmp_path / "sheet.png", per_class=5)
    sheet = Image.open(path)
    assert sheet.size == (5 * 34 + 2, 10 * 34 + 2)
    # the first tile of the cat row (row 3) is not the blank background
    tile = sheet.crop((2, 2 + 3 * 34, 34, 34 + 3 * 34))
    assert len(np.unique(np.asarray(tile).reshape(-1, 3), axis=0)) > 10

"""Fast tar listing and writing agree with Python's tarfile, byte for byte."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from cgan_pipe.data import tars
from cgan_pipe.config import DataConfig
from cgan_pipe.data.shards import prepare
from cgan_pipe.data.sources import open_source
from cgan_pipe.errors import DataError

from conftest import CIFAR, SAMPLE, write_tar


def tarfile_listing(path):
    with tarfile.open(path) as tar:
        return [tars.TarEntry(m.name, m.offset_data, m.size, m.isfile(), m.isdir()) for m in tar.getmembers()]


def test_listing_the_cifar_archive_equals_tarfile(tmp_path):
    path = CIFAR / "test.tar"
    if not path.exists():  # the repository's sample, uncompressed: the same kind of archive, shorter
        path = tmp_path / "sample.tar"
        with gzip.open(SAMPLE) as packed:
            path.write_bytes(packed.read())
    assert list(tars.iter_members(path)) == tarfile_listing(path)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_listing_equals_tarfile_for_each_tar_format(tmp_path, fmt):
    path = tmp_path / "a.tar"
    long_dir = "deep/" + "d" * 120  # too long for a plain header: a ustar prefix, GNU long name or PAX
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in [("cat/a.jpg", b"x" * 700), (f"{long_dir}/b.jpg", b"y" * 512), ("é/ü.png", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("cat/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
        folder = tarfile.TarInfo("empty")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    assert list(tars.iter_members(path)) == tarfile_listing(path)


def test_a_corrupt_or_truncated_archive_is_a_data_error_naming_it(tmp_path):
    path = write_tar(tmp_path / "a.tar", {"cat/a.jpg": b"x" * 5000, "cat/b.jpg": b"y" * 10})
    data = bytearray(path.read_bytes())
    data[148:156] = b"0000000\x00"  # wrong checksum in the first header
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="bad.tar"):
        list(tars.iter_members(bad))
    short = tmp_path / "short.tar"
    short.write_bytes(path.read_bytes()[:3000])  # ends inside the first member's data
    with pytest.raises(DataError, match="short.tar"):
        list(tars.iter_members(short))


@pytest.mark.parametrize("name,size", [("00000001.jpg", 1234), ("x.json", 0), ("é" * 10 + ".cls", 512)])
def test_headers_equal_tarfiles(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    assert tars.ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def test_an_archive_written_here_equals_tarfiles(tmp_path):
    members = {"00000000.jpg": b"a" * 1000, "00000000.json": b"{}", "00000001.jpg": b"b" * 512}
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    ours = b"".join(tars.member_bytes(name, data) for name, data in members.items())
    assert ours + tars.archive_end(len(ours)) == (tmp_path / "ref.tar").read_bytes()


def test_a_gzipped_tar_is_decompressed_once_and_read_in_place(tmp_path):
    plain = write_tar(tmp_path / "a.tar", {"cat/a.jpg": b"A" * 3000, "dog/b.jpg": b"B" * 10})
    packed = tmp_path / "a.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert tars.compression_of(packed) == "gzip" and tars.compression_of(plain) is None
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with open_source(str(packed), scratch_dir=scratch) as src:
        assert src.class_names == ["cat", "dog"]
        assert [src.read(item).data for item in src.items] == [b"A" * 3000, b"B" * 10]
        assert len(list(scratch.glob(".source-*.tar"))) == 1
    with open_source(str(packed)) as src:  # no scratch folder: a temporary one, removed on close
        reader = src.reader
        assert reader.archive.exists()
    assert not reader.archive.exists()


def test_prepare_from_a_gzipped_tar_equals_the_plain_tar_and_cleans_up(small_tar, tmp_path):
    packed = tmp_path / "small.tar.gz"
    packed.write_bytes(gzip.compress(small_tar.read_bytes()))
    from_plain, _ = prepare(DataConfig(str(small_tar), shard_size=120), tmp_path / "plain", progress=False)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "notes.source-list.txt").write_text("the user's")  # named much like a decompressed source
    from_gzip, _ = prepare(DataConfig(str(packed), shard_size=120), tmp_path / "gz", progress=False)
    assert [s.sha256 for s in from_gzip.shards] == [s.sha256 for s in from_plain.shards]
    (tmp_path / "gz" / "notes.source-list.txt").unlink()  # kept: the decompressed source alone was removed
    assert sorted(p.name for p in (tmp_path / "gz").iterdir()) == sorted(p.name for p in (tmp_path / "plain").iterdir())

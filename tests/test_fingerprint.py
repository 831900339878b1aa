"""Content hashes of raw sources and shard sets: bytes count, modification times and hidden files do not."""

from __future__ import annotations

import os
import tarfile

from cgan_pipe.data import fingerprint
from cgan_pipe.data.fingerprint import shard_set_fingerprint, source_fingerprint
from cgan_pipe.data.manifest import read_manifest


def _image_folder(small_tar, root):
    with tarfile.open(small_tar) as tar:
        tar.extractall(root, members=tar.getmembers()[:30], filter="data")
    return root


def test_a_folder_is_hashed_by_its_bytes_and_each_file_once(small_tar, tmp_path, monkeypatch):
    root, cache = _image_folder(small_tar, tmp_path / "images"), tmp_path / "cache"
    hashed = []
    real = fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    first = source_fingerprint(str(root), cache)
    assert len(hashed) == 30 and len(first) == 64
    assert source_fingerprint(str(root), cache) == first and len(hashed) == 30  # remembered: nothing read again

    images = sorted(p for p in root.rglob("*") if p.is_file())
    os.utime(images[0], ns=(1, 1))  # a new modification time, the same bytes: read again, same hash
    assert source_fingerprint(str(root), cache) == first and hashed[30:] == [images[0].name]
    (root / ".DS_Store").write_bytes(b"finder")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(images[1].read_bytes())
    assert source_fingerprint(str(root), cache) == first

    images[0].write_bytes(images[1].read_bytes())  # one image replaced by another
    changed = source_fingerprint(str(root), cache)
    assert changed != first
    images[1].rename(images[1].with_name("renamed.jpg"))  # the same bytes under another name
    assert source_fingerprint(str(root), cache) not in (first, changed)
    assert source_fingerprint(str(root), tmp_path / "empty-cache") == source_fingerprint(str(root), cache)


def test_a_file_rewritten_in_place_with_its_modification_time_set_back_is_read_again(small_tar, tmp_path):
    root, cache = _image_folder(small_tar, tmp_path / "images"), tmp_path / "cache"
    first = source_fingerprint(str(root), cache)
    image = sorted(p for p in root.rglob("*") if p.is_file())[0]
    before = image.stat()
    with open(image, "r+b") as handle:  # the same size, other bytes, the old modification time
        handle.seek(100)
        handle.write(bytes(50))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert source_fingerprint(str(root), cache) != first


def test_archives_list_files_and_downloads(small_tar, tmp_path):
    cache = tmp_path / "cache"
    assert source_fingerprint(str(small_tar), cache) == source_fingerprint(str(small_tar), tmp_path / "other")
    root = _image_folder(small_tar, tmp_path / "images")
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    listing = root / "list.txt"
    listing.write_text("# three images\n" + "\n".join(names[:3]) + "\n")
    first = source_fingerprint(str(listing), cache)
    (root / names[5]).write_bytes(b"not listed")  # a file the list does not name does not count
    assert source_fingerprint(str(listing), cache) == first
    (root / names[0]).write_bytes((root / names[1]).read_bytes())  # a listed one does
    assert source_fingerprint(str(listing), cache) != first
    assert source_fingerprint("download:cifar10", cache) != source_fingerprint("download:cifar100", cache)
    assert source_fingerprint(str(tmp_path / "missing"), cache) is None


def test_a_shard_set_is_named_by_its_recorded_sums(small_shards):
    manifest = read_manifest(small_shards)
    assert shard_set_fingerprint(manifest) == shard_set_fingerprint(read_manifest(small_shards))
    manifest.shards[0].sha256 = "0" * 64
    assert shard_set_fingerprint(manifest) != shard_set_fingerprint(read_manifest(small_shards))

"""Raw sources: folder trees, tars of them, the CIFAR-10 python archive; stable class ids."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from cgan_pipe.config import DataConfig

from cgan_pipe.data.shards import prepare
from cgan_pipe.data.sources import CIFAR10_CLASSES, label_folders, open_source
from cgan_pipe.data.verify import verify_shards
from cgan_pipe.errors import DataError

from conftest import CLASSES, cifar_members


def test_tar_source_labels_follow_sorted_class_folders(small_tar):
    with open_source(str(small_tar)) as src:
        assert src.class_names == CLASSES
        assert len(src.items) == 200
        by_path = {item.path: item.label for item in src.items}
        assert by_path["test/cat/0000.jpg"] == 3
        assert by_path["test/truck/0000.jpg"] == 9
        raw = src.read(src.items[0])
        assert raw.data[:2] == b"\xff\xd8"  # the original JPEG bytes


def test_folder_source_and_unlabelled_folder(tmp_path):
    members = cifar_members("test", 2)
    for name, data in members.items():
        (tmp_path / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / name).write_bytes(data)
    with open_source(str(tmp_path / "tree")) as src:
        assert src.class_names == CLASSES and len(src.items) == 20
    with open_source(str(tmp_path / "tree" / "test" / "cat")) as src:
        assert src.class_names == [] and all(item.label is None for item in src.items)


def test_a_file_that_cannot_be_read_is_a_data_error_naming_it(tmp_path):
    # (as root, permissions cannot make a file unreadable: a file gone after listing can)
    for name, data in cifar_members("test", 1).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    with open_source(str(tmp_path / "test")) as src:
        gone = src.items[0]
        (tmp_path / "test" / gone.path).unlink()
        with pytest.raises(DataError, match=f"cannot read .*{gone.path} \\(No such file"):
            src.read(gone)
        assert src.read(src.items[1]).data


def test_classes_come_from_the_folders_below_the_common_root():
    assert label_folders(["./cat", "./dog/sub"]) == (["cat", "dog"], {"./cat": 0, "./dog/sub": 1})
    assert label_folders(["train/cat", "train/dog"])[0] == ["cat", "dog"]
    assert label_folders(["only"]) == ([], {"only": None})  # all images in one folder: unlabelled
    assert label_folders([""]) == ([], {"": None})


def test_mixed_layout_is_an_error():
    with pytest.raises(DataError, match="both at the top"):
        label_folders(["root", "root/cat"])


def test_missing_source_names_the_path():
    with pytest.raises(DataError, match="'/no/such/archive.tar' does not exist"):
        open_source("/no/such/archive.tar")


def _cifar_batch(images: list[np.ndarray], labels: list[int]) -> bytes:
    data = np.stack([im.transpose(2, 0, 1).reshape(-1) for im in images])
    return pickle.dumps({b"data": data, b"labels": labels,
                         b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]})


def test_cifar_python_archive(tmp_path):
    # The official archive's layout, filled with real CIFAR-10 pixels (decoded from the shared JPEGs).
    members = cifar_members("test", 1)
    images = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in members.values()]
    labels = [CLASSES.index(name.split("/")[1]) for name in members]
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, blob in [("batches.meta", pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}))] + \
                [(f"data_batch_{i}", _cifar_batch(images[2 * (i - 1):2 * i], labels[2 * (i - 1):2 * i]))
                 for i in range(1, 6)] + [("test_batch", _cifar_batch(images[:1], labels[:1]))]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with open_source(str(archive)) as src:
        assert src.class_names == CIFAR10_CLASSES
        assert [item.label for item in src.items] == labels
        assert np.array_equal(src.read(src.items[3]).pixels, images[3])
    with open_source(str(archive), split="test") as src:
        assert len(src.items) == 1


def test_cifar_archive_with_code_in_its_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({}))
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": Payload()}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        open_source(str(folder))


def test_a_shard_set_is_a_source_for_resharding(small_shards, tmp_path):
    manifest, _ = prepare(DataConfig(str(small_shards), format="png", shard_size=50), tmp_path / "re", progress=False)
    assert manifest.num_samples == 200 and len(manifest.shards) == 4
    assert manifest.class_histogram == {c: 20 for c in CLASSES}  # class ids survive the round trip
    assert manifest.quality_histogram == {"None": 200}
    assert verify_shards(tmp_path / "re").ok


def test_a_list_file_of_paths(tmp_path):
    members = cifar_members("test", 2)
    for name, data in members.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    listing = tmp_path / "images.txt"
    listing.write_text("# my subset\n" + "\n".join(list(members)[:5]) + "\ntest/cat/missing.jpg\n\n")
    with open_source(str(listing)) as src:
        assert [item.path for item in src.items] == sorted(list(members)[:5])
        assert src.class_names == ["airplane", "automobile", "bird"]  # the classes present in the list
        assert src.rejected == [{"source": "test/cat/missing.jpg", "kind": "listed file does not exist",
                             "reason": "listed file does not exist"}]
        assert src.read(src.items[0]).data == members[src.items[0].path]

"""Both loaders honour the batch contract, and labels survive DALI's raw-bytes outputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cgan_pipe.config import DataConfig, LoaderConfig
from cgan_pipe.data.loader import open_loader
from cgan_pipe.data.batch import parse_ascii_labels
from cgan_pipe.data.epochs import EpochMark
from cgan_pipe.data.shards import prepare
from cgan_pipe.errors import ConfigError, DataError
from cgan_pipe.metrics.quality import block_edge_ratio, block_steps

from conftest import CLASSES, cifar_members, write_tar

BACKENDS = ["dali", "torch"]


@pytest.fixture(scope="module")
def one_per_class(tmp_path_factory):
    """Shards holding the first test image of every class, and those images decoded by Pillow."""
    members = cifar_members("test", 1)
    root = tmp_path_factory.mktemp("one")
    prepare(DataConfig(str(write_tar(root / "src.tar", members))), root / "shards", progress=False)
    reference = {name.split("/")[1]: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
                 for name, data in members.items()}
    return root / "shards", reference


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_contract(small_shards, backend):
    loader = open_loader(small_shards, LoaderConfig(backend=backend, threads=1), 32, 0, torch.device("cpu"))
    assert loader.info.resolution == 32 and loader.info.channels == 3
    assert loader.info.class_names == tuple(CLASSES) and loader.info.num_samples == 200
    batches = iter(loader)
    sizes = []
    for _ in range(9):  # crosses the 200-sample epoch boundary
        batch = next(batches)
        n = batch.images.shape[0]
        sizes.append(n)
        assert 1 <= n <= 32 and batch.images.shape[1:] == (3, 32, 32) and batch.images.dtype == torch.float32
        assert -1.0 <= batch.images.min() < 0 < batch.images.max() <= 1.0
        assert batch.labels.dtype == torch.int64 and batch.labels.shape == (n,)
        assert 0 <= batch.labels.min() and batch.labels.max() <= 9
        assert batch.quality is None
    assert sum(sizes) > 200 and max(sizes) == 32  # full batches, the last of an epoch may be smaller


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_images_arrive_with_their_class(one_per_class, backend):
    shards, reference = one_per_class
    cfg = LoaderConfig(backend=backend, threads=1, hflip=False)
    batch = next(iter(open_loader(shards, cfg, 10, 0, torch.device("cpu"))))
    pixels = ((batch.images.permute(0, 2, 3, 1).numpy() + 1) * 127.5)
    names = list(reference)
    for image, label in zip(pixels, batch.labels.tolist()):
        errors = [np.abs(image - reference[n]).mean() for n in names]
        match = names[int(np.argmin(errors))]
        assert min(errors) < 2.0, "decoded pixels should match a Pillow decode of the same JPEG"
        assert label == CLASSES.index(match)
    cat = int(np.argmin([np.abs(p - reference["cat"]).mean() for p in pixels]))
    assert batch.labels[cat].item() == 3  # the known cat image (test/cat/0000.jpg) is class 3


def test_unlabelled_shards_give_zero_labels(tmp_path):
    members = {f"imgs/{i}.jpg": data for i, data in enumerate(cifar_members("test", 1).values())}
    prepare(DataConfig(str(write_tar(tmp_path / "u.tar", members))), tmp_path / "s", progress=False)
    for backend in BACKENDS:
        loader = open_loader(tmp_path / "s", LoaderConfig(backend=backend, threads=1), 5, 0, torch.device("cpu"))
        assert loader.info.num_classes == 0
        assert next(iter(loader)).labels.tolist() == [0] * 5


def test_parse_ascii_labels_handles_multi_digit_and_padding():
    rows = [b"3", b"12", b"7\n", b"0"]
    raw = torch.tensor([list(r.ljust(4, b"\0")) for r in rows], dtype=torch.uint8)
    assert parse_ascii_labels(raw).tolist() == [3, 12, 7, 0]
    for bad in (b"", b"x", b"1x"):  # never a silent label 0
        with pytest.raises(DataError, match="not a class id"):
            parse_ascii_labels(torch.tensor([list(b"1".ljust(4, b"\0")), list(bad.ljust(4, b"\0"))],
                                            dtype=torch.uint8))


def test_batch_larger_than_the_data_is_a_config_error(small_shards):
    with pytest.raises(ConfigError, match="train.batch_size: 500 is larger than the 200 samples"):
        open_loader(small_shards, LoaderConfig(), 500, 0, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (DALI mixed decode)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_decode_gives_the_same_contract_on_cuda(one_per_class, backend):
    shards, reference = one_per_class
    cfg = LoaderConfig(backend=backend, device="cuda", threads=1, hflip=False)
    batch = next(iter(open_loader(shards, cfg, 10, 0, torch.device("cuda"))))
    assert batch.images.is_cuda and batch.labels.is_cuda
    pixels = ((batch.images.permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5)
    cat = int(np.argmin([np.abs(p - reference["cat"]).mean() for p in pixels]))
    assert batch.labels[cat].item() == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG decode)")
def test_gpu_decode_never_writes_into_memory_queued_kernels_still_read():
    """The torch backend's nvJPEG decode must not be handed memory that kernels queued on the training
    stream have yet to read (pytorch/vision#9606). Kernels are queued to read tensors behind a long one, the
    tensors are freed, a batch is decoded, and the kernels' results must be those of the untouched values."""
    from cgan_pipe.data.torch_loader import _decode_jpegs

    jpegs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in cifar_members("test", 4).values()]
    cuda = torch.device("cuda")
    for attempt in range(20):
        held = [torch.full((3, 32, 32), float(i), device=cuda).to(torch.uint8) for i in range(len(jpegs))]
        torch.cuda.synchronize()
        busy = torch.randn(2048, 2048, device=cuda)
        for _ in range(20):
            busy = busy @ busy / 2048  # keeps the stream busy while the reads below wait behind it
        sums = [tensor.double().sum() for tensor in held]
        del held
        decoded = _decode_jpegs(jpegs, cuda)
        torch.cuda.synchronize()
        assert [s.item() for s in sums] == [float(i) * 3 * 32 * 32 for i in range(len(jpegs))], attempt
        assert all(image.shape == (3, 32, 32) for image in decoded)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_reach_the_gpu_without_a_host_sync():
    from cgan_pipe.data.batch import to_device

    labels = torch.arange(64)
    torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises
    try:
        on_gpu = to_device(labels, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    labels.fill_(-1)  # the source may be reused at once: what was copied is a pinned copy of it
    assert on_gpu.tolist() == list(range(64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_backend_on_a_gpu_with_jpeg_distortion_decodes_in_the_workers(small_shards):
    from cgan_pipe.data.torch_loader import TorchLoader
    from cgan_pipe.data.manifest import read_manifest

    cfg = LoaderConfig(backend="torch", device="cuda", threads=1, jpeg_distort=[10, 40])
    loader = TorchLoader(small_shards, read_manifest(small_shards), cfg, 16, 0, torch.device("cuda"),
                         with_quality=True)
    batch = next(iter(loader))
    assert not loader.gpu_decode and batch.images.is_cuda and batch.quality.is_cuda
    assert ((batch.quality >= 0.10) & (batch.quality <= 0.40)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_see_every_sample_exactly_once_per_epoch(small_shards, backend):
    """small_shards: 200 samples in 2 shards (120 + 80). Each rank reads its share in batches of
    16, the last of an epoch partial; together each epoch is the whole set, nothing dropped or
    repeated. Both backends split by whole shards."""
    from cgan_pipe.data.dali_loader import DaliLoader
    from cgan_pipe.data.manifest import read_manifest
    from cgan_pipe.data.torch_loader import TorchLoader

    manifest = read_manifest(small_shards)
    config = LoaderConfig(backend=backend, threads=1, hflip=False)
    make = DaliLoader if backend == "dali" else TorchLoader
    epochs: dict[int, list[bytes]] = {0: [], 1: []}
    shares = []
    for rank in (0, 1):
        loader = make(small_shards, manifest, config, 16, 0, torch.device("cpu"), rank=rank, world_size=2)
        shares.append(loader.samples_per_epoch)
        batches = iter(loader)
        for epoch in epochs:
            seen = 0
            while seen < loader.samples_per_epoch:
                batch = next(batches)
                seen += batch.images.shape[0]
                epochs[epoch] += [image.numpy().tobytes() for image in batch.images]
            assert seen == loader.samples_per_epoch  # the epoch ends on a batch boundary
    assert shares == [120, 80]  # whole shards: rank 0 reads shard 0 (120 samples), rank 1 shard 1
    for images in epochs.values():
        assert len(images) == 200 and len(set(images)) == 200


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loader_opened_at_a_position_goes_on_within_its_epoch(small_shards, backend):
    """small_shards: 2 shards (120 + 80). With a small shuffle buffer the first batches come from the first
    shard of epoch 0's order only; a loader opened at their position reads the other shard, then whole epochs."""
    from cgan_pipe.data.epochs import LoaderPosition

    config = LoaderConfig(backend=backend, threads=1, hflip=False, shuffle_buffer=8)

    def pixels(batch):
        return [image.numpy().tobytes() for image in batch.images]

    first = iter(open_loader(small_shards, config, 16, 7, torch.device("cpu")))
    position, seen = LoaderPosition.first(1), []
    for _ in range(3):
        batch = next(first)
        position = position.after(batch.mark)
        seen += pixels(batch)
    assert position == LoaderPosition(0, (1,))
    resumed = open_loader(small_shards, config, 16, 7, torch.device("cpu"), start=position)
    rest, later, marks = [], [], []
    for batch in resumed:
        marks.append(batch.mark)
        (rest if batch.mark.epoch == 0 else later).extend(pixels(batch))
        if len(later) >= 200:
            break
    assert len(rest) in (80, 120) and len(seen) + len(rest) < 200  # the other shard, less nothing of it
    assert not set(seen) & set(rest)  # no sample twice in the epoch
    assert len(later) == 200 and len(set(later)) == 200  # then the whole set, once
    assert marks[0] == EpochMark(0, 0, 2) and marks[-1].epoch == 1
    again = iter(open_loader(small_shards, config, 16, 7, torch.device("cpu")))
    assert [pixels(next(again)) for _ in range(3)] == [seen[i:i + 16] for i in range(0, 48, 16)]  # seeded


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("augment", [{"pad_crop": 4}, {"resized_crop_min_scale": 0.3}, {"color_jitter": 0.5}])
def test_augmentations_change_pixels_but_not_the_contract(one_per_class, backend, augment):
    shards, reference = one_per_class
    cfg = LoaderConfig(backend=backend, threads=1, hflip=False, **augment)
    batch = next(iter(open_loader(shards, cfg, 10, 0, torch.device("cpu"))))
    assert batch.images.shape == (10, 3, 32, 32) and -1.0 <= batch.images.min() and batch.images.max() <= 1.0
    pixels = (batch.images.permute(0, 2, 3, 1).numpy() + 1) * 127.5
    changed = [min(np.abs(image - ref).mean() for ref in reference.values()) > 2.0 for image in pixels]
    assert sum(changed) >= 5, "most images should differ from their plain decode"


def _damaged_copy(small_shards, tmp_path, damage, checksummed_after=False):
    """A copy of the shards with shard 1 damaged in place; with `checksummed_after` its manifest
    records the damaged bytes' checksum (as for a shard written badly), so only the loaders' own
    per-sample checks can catch it."""
    import json
    import shutil

    from cgan_pipe.data.manifest import parse_dali_index
    from cgan_pipe.data.digest import file_sha256

    copy = tmp_path / "shards"
    shutil.copytree(small_shards, copy)
    samples = list(parse_dali_index(copy / "shard-000001.idx"))
    with open(copy / "shard-000001.tar", "r+b") as handle:
        damage(handle, samples)
    if checksummed_after:
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["shards"][1]["sha256"] = file_sha256(copy / "shard-000001.tar")
        (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _spoil_images(handle, samples):
    for files in samples:
        image = next(f for f in files if f.ext == "jpg")
        handle.seek(image.offset + 20)
        handle.write(bytes(image.size - 20))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shard_whose_bytes_changed_is_named_before_any_decoder_sees_it(small_shards, tmp_path, backend):
    copy = _damaged_copy(small_shards, tmp_path, _spoil_images)  # DALI's CPU decoder has segfaulted on these
    with pytest.raises(DataError, match=r"shard-000001.tar: its bytes changed since it was written .*verify"):
        open_loader(copy, LoaderConfig(backend=backend, threads=1), 16, 0, torch.device("cpu"))


def test_checksums_are_checked_once_per_shard_file(small_shards, tmp_path, monkeypatch):
    import os

    import cgan_pipe.data.verify as verify

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hashed = []
    real = verify.file_sha256
    monkeypatch.setattr(verify, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    cfg = LoaderConfig(backend="torch", threads=1)
    open_loader(small_shards, cfg, 16, 0, torch.device("cpu"))
    open_loader(small_shards, cfg, 16, 0, torch.device("cpu"))
    assert sorted(hashed) == ["shard-000000.tar", "shard-000001.tar"]  # the second open trusted the record
    stat = (small_shards / "shard-000001.tar").stat()
    os.utime(small_shards / "shard-000001.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    open_loader(small_shards, cfg, 16, 0, torch.device("cpu"))
    assert sorted(hashed) == ["shard-000000.tar", "shard-000001.tar", "shard-000001.tar"]  # touched: checked again


@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_changed_in_place_with_their_modification_time_set_back_are_checked_again(small_shards, tmp_path,
                                                                                       backend):
    import os
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(small_shards, copy, copy_function=shutil.copy2)
    cfg = LoaderConfig(backend=backend, threads=1)
    open_loader(copy, cfg, 16, 0, torch.device("cpu"))  # checked, and remembered as checked
    shard = copy / "shard-000001.tar"
    before = shard.stat()
    with open(shard, "r+b") as handle:
        _spoil_images(handle, list(_index(copy / "shard-000001.idx")))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and modification time as they were
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(DataError, match=r"shard-000001.tar: its bytes changed since it was written .*verify"):
        open_loader(copy, cfg, 16, 0, torch.device("cpu"))


def _index(path):
    from cgan_pipe.data.manifest import parse_dali_index

    return parse_dali_index(path)


def test_a_dali_decode_failure_in_its_first_batches_is_named(small_shards, tmp_path):
    import subprocess
    import sys

    copy = _damaged_copy(small_shards, tmp_path, _spoil_images, checksummed_after=True)  # written damaged
    # in a process of its own: DALI's CPU decoder has crashed a process on garbage JPEG bytes before
    opened = subprocess.run([sys.executable, "-c", f"""
import torch
from cgan_pipe.config import LoaderConfig
from cgan_pipe.data.loader import open_loader
from cgan_pipe.errors import DataError
try:
    for _, batch in zip(range(20), open_loader({str(copy)!r}, LoaderConfig(threads=1), 16, 0, torch.device("cpu"))):
        pass
except DataError as exc:
    print(exc)
"""], capture_output=True, text=True, timeout=300)
    assert opened.returncode == 0, opened.stderr
    assert f"{copy}: the DALI loader failed on a sample (" in opened.stdout
    assert f"run `cgan-pipe verify {copy}` to list the bad samples" in opened.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_class_id_the_manifest_does_not_list_is_an_error_in_the_loader(small_shards, tmp_path, backend):
    import json
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(small_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["class_names"] = manifest["class_names"][:3]  # samples of classes 3-9 are now outside it
    manifest["class_histogram"] = {name: 20 for name in manifest["class_names"]}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    batches = iter(open_loader(copy, LoaderConfig(backend=backend, threads=1), 16, 0, torch.device("cpu")))
    with pytest.raises(DataError, match=r"shards: a sample's .cls is \d, but the manifest lists 3 classes \(0-2\); "
                                        r"run `cgan-pipe verify .*shards` to find it"):
        for _ in range(20):
            next(batches)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shuffle_buffer_beyond_the_set_holds_the_set_and_one_beyond_memory_is_refused(small_shards, backend,
                                                                                         monkeypatch):
    import cgan_pipe.data.loader as loader_module

    huge = LoaderConfig(backend=backend, threads=1, shuffle_buffer=99_999_999_999)  # DALI: bad_alloc after 78 s
    batch = next(iter(open_loader(small_shards, huge, 16, 0, torch.device("cpu"))))
    assert batch.images.shape == (16, 3, 32, 32)
    monkeypatch.setattr(loader_module, "available_memory", lambda device: 100_000)  # a machine with 100 kB free
    with pytest.raises(ConfigError, match=r"loader.shuffle_buffer: 200 samples of .* \(about [\d.]+ KiB each\) would "
                                          r"hold .* GiB, more than the 0.0 GiB of memory free; lower it"):
        open_loader(small_shards, huge, 16, 0, torch.device("cpu"))


def test_thousands_of_loader_threads_are_refused_before_any_starts(small_shards):
    with pytest.raises(ConfigError, match=r"loader.threads: 100000 is more than \d+ \(four per core"):
        open_loader(small_shards, LoaderConfig(backend="torch", threads=100_000), 16, 0, torch.device("cpu"))


def test_a_manifest_of_a_resolution_no_network_has_is_refused(small_shards, tmp_path):
    import json
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(small_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "resolution": 33}))
    with pytest.raises(DataError, match=r"manifest.json: resolution 33 is not a power of two between 8 and 1024"):
        open_loader(copy, LoaderConfig(threads=1), 16, 0, torch.device("cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_truncated_shard_is_named_before_any_batch(small_shards, tmp_path, backend):
    copy = _damaged_copy(small_shards, tmp_path, lambda handle, samples: handle.truncate(30000))
    with pytest.raises(DataError, match="shard-000001.tar: 30000 bytes where the manifest says"):
        open_loader(copy, LoaderConfig(backend=backend, threads=1), 16, 0, torch.device("cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_class_file_that_is_not_a_number_is_an_error_not_a_label(small_shards, tmp_path, backend):
    def spoil_labels(handle, samples):
        for files in samples:
            cls = next(f for f in files if f.ext == "cls")
            handle.seek(cls.offset)
            handle.write(b"x" * cls.size)

    copy = _damaged_copy(small_shards, tmp_path, spoil_labels, checksummed_after=True)
    batches = iter(open_loader(copy, LoaderConfig(backend=backend, threads=1), 16, 0, torch.device("cpu")))
    with pytest.raises(DataError, match="verify"):
        for _ in range(20):  # 320 samples: both shards are read
            next(batches)


def test_an_undecodable_image_names_the_shard_set(small_shards, tmp_path):
    # (torch backend only: DALI has segfaulted this process on garbage JPEG bytes; the checksums keep
    # such bytes from it, test above, and verify decodes in a subprocess)
    copy = _damaged_copy(small_shards, tmp_path, _spoil_images, checksummed_after=True)
    batches = iter(open_loader(copy, LoaderConfig(backend="torch", threads=1), 16, 0, torch.device("cpu")))
    with pytest.raises(DataError, match=f"{copy}: the torch loader failed on a sample"):
        for _ in range(20):
            next(batches)


@pytest.fixture()
def served(small_shards):
    """small_shards served over HTTP from this machine (a real server, no outside network)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(small_shards))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_the_torch_backend_streams_shards_from_a_url(served):
    loader = open_loader(served, LoaderConfig(backend="torch", threads=1), 16, 0, torch.device("cpu"))
    assert loader.info.num_samples == 200 and loader.samples_per_epoch == 200
    batches = iter(loader)
    seen = 0
    while seen < 200:
        batch = next(batches)
        seen += batch.images.shape[0]
        assert batch.images.shape[1:] == (3, 32, 32) and batch.labels.max() <= 9
    assert seen == 200


def test_dali_streams_shards_from_a_url_and_a_bad_url_is_named(served):
    loader = open_loader(served, LoaderConfig(backend="dali", threads=1), 50, 0, torch.device("cpu"))
    batches = iter(loader)
    assert sum(len(next(batches).labels) for _ in range(4)) == 200 == loader.samples_per_epoch
    with pytest.raises(ConfigError, match="loader.bucket_reads: samples reads s3:// only"):
        open_loader(served, LoaderConfig(backend="dali", bucket_reads="samples"), 16, 0, torch.device("cpu"))
    with pytest.raises(DataError, match="missing/manifest.json: no manifest, so .*missing is not a complete shard"):
        open_loader(served + "missing", LoaderConfig(backend="torch"), 16, 0, torch.device("cpu"))


def test_training_reads_shards_from_a_url(served, tmp_path):
    import dataclasses

    from cgan_pipe.train.loop import train

    from conftest import small_config

    cfg = small_config(tmp_path, steps=2)
    cfg = dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, backend="torch", shards=served))
    result = train(cfg, cfg.loader.shards, tmp_path, progress=False)
    assert result.steps == 2 and result.checkpoint.exists()


def test_batched_decode_keeps_order_across_jpeg_and_png(one_per_class):
    # the GPU path of the torch backend, run here on the CPU device: JPEGs in one decode_jpeg call
    from torchvision.io import decode_image

    from cgan_pipe.data.torch_loader import _decode_batch

    jpegs = list(cifar_members("test", 1).values())[:3]
    png = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).save(png, "PNG")
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in [jpegs[0], png.getvalue(), *jpegs[1:]]]
    decoded = _decode_batch(encoded, torch.device("cpu"))
    assert [torch.equal(d, decode_image(e)) for d, e in zip(decoded, encoded)] == [True] * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_carry_each_samples_jpeg_quality_when_asked(quality_shards, small_shards, backend):
    config = LoaderConfig(backend=backend, threads=1)
    loader = open_loader(quality_shards, config, 50, 0, torch.device("cpu"), with_quality=True)
    batches, qualities = iter(loader), []
    while len(qualities) < loader.samples_per_epoch:  # one epoch: every sample once
        batch = next(batches)
        assert batch.quality.dtype == torch.float32 and batch.quality.shape == batch.labels.shape
        qualities += batch.quality.tolist()
    assert sorted(set(qualities)) == pytest.approx([0.1, 0.5, 0.9])
    assert [qualities.count(q) for q in sorted(set(qualities))] == [200, 200, 200]
    assert next(iter(open_loader(quality_shards, config, 50, 0, torch.device("cpu")))).quality is None


def test_a_set_without_quality_metadata_is_refused_with_how_to_make_one(tmp_path):
    out = tmp_path / "png"
    source = write_tar(tmp_path / "src.tar", cifar_members("test", 1))
    prepare(DataConfig(str(source), format="png"), out, progress=False)
    with pytest.raises(ConfigError, match=r"10 samples have no JPEG quality .* --quality 10,30,50,75,95"):
        open_loader(out, LoaderConfig(threads=1), 5, 0, torch.device("cpu"), with_quality=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_the_fly_jpeg_distortion_draws_a_quality_per_sample_and_shows_block_artefacts(small_shards, backend):
    plain = LoaderConfig(backend=backend, threads=1, hflip=False)
    distorted = LoaderConfig(backend=backend, threads=1, hflip=False, jpeg_distort=[10, 12])
    clean_batch = next(iter(open_loader(small_shards, plain, 200, 0, torch.device("cpu"))))
    # small_shards records no per-sample quality range: the drawn one is the sample's quality
    batch = next(iter(open_loader(small_shards, distorted, 200, 0, torch.device("cpu"), with_quality=True)))
    assert sorted(set(batch.quality.mul(100).round().int().tolist())) == [10, 11, 12]
    assert block_edge_ratio(block_steps(batch.images)) > 1.3 * block_edge_ratio(block_steps(clean_batch.images))
    lowest = LoaderConfig(backend=backend, threads=1, hflip=False, jpeg_distort=[1, 1])
    assert next(iter(open_loader(small_shards, lowest, 200, 0, torch.device("cpu"),
                                 with_quality=True))).quality.unique().tolist() == pytest.approx([0.01])

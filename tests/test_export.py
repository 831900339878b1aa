"""Export: files and shards per format, reproducible seeds, classes, resume, ranks, round trips."""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

import cgan_pipe.export as export_module
from cgan_pipe import images
from cgan_pipe.atomic import TEMP_MARK
from cgan_pipe.config import DataConfig, ExportConfig, LoaderConfig
from cgan_pipe.schema import from_options
from cgan_pipe.data.loader import open_loader
from cgan_pipe.data.manifest import read_manifest
from cgan_pipe.data.shards import prepare
from cgan_pipe.errors import ConfigError, DataError
from cgan_pipe.export import WORK_NAME, export
from cgan_pipe.generation import generate, latents, load_generator
from cgan_pipe.train.checkpoint import load_checkpoint

CPU = torch.device("cpu")


def _settings(**keys) -> ExportConfig:
    """An export section with these keys, validated as a pipeline's YAML export section is."""
    return from_options(ExportConfig, {key: (f"export.{key}", value) for key, value in keys.items()})


def _export(checkpoint: Path, out: Path, **keys) -> export_module.ExportResult:
    return export(checkpoint, out, _settings(**keys), device=CPU, progress=False)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes), hidden ones included."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _without_records(tree: dict[str, bytes]) -> dict[str, bytes]:
    """A tree less the files that name the run (export.json, the manifest's settings)."""
    return {k: v for k, v in tree.items() if k not in ("export.json", "shards/manifest.json")}


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_export_writes_files_shards_and_a_contact_sheet_that_the_loader_reads(checkpoint, tmp_path, fmt):
    out = tmp_path / "out"
    result = _export(checkpoint, out, n=25, format=fmt, quality=90, batch_size=8, shard_size=10)
    assert result.n == 25 and not result.up_to_date
    ext = images.EXTENSIONS[fmt]
    files = sorted(out.glob(f"files/*/*.{ext}"))
    assert len(files) == 25
    q = 0 if fmt == "png" else 90
    assert out / "files" / "airplane" / f"seed0000000-c0-q{q}.{ext}" in files
    assert out / "files" / "cat" / f"seed0000013-c3-q{q}.{ext}" in files  # class round robin: seed 13 -> class 3
    for path in files:
        assert Image.open(path).size == (32, 32)
    manifest = read_manifest(out / "shards")
    assert manifest.created_by == "export" and manifest.num_samples == 25
    assert [s.samples for s in manifest.shards] == [10, 10, 5]
    with tarfile.open(out / "shards" / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("00000003.json").read())
        assert int(tar.extractfile("00000003.cls").read()) == 3
        assert tar.extractfile("00000003." + ext).read() == (out / "files" / "cat" / f"seed0000003-c3-q{q}.{ext}"
                                                              ).read_bytes()
    assert meta["seed"] == 3 and meta["class"] == "cat" and meta["quality"] == (None if fmt == "png" else 90)
    assert len(meta["checkpoint_sha256"]) == 64
    sheet = Image.open(out / "contact-sheet.png")
    assert sheet.size == (5 * 34 + 2, 5 * 34 + 2)  # 25 images, 5 per row, 2-pixel gaps
    leftovers = [p for p in out.rglob("*") if TEMP_MARK in p.name or p.name.startswith(".")]
    assert leftovers == [] and not list(tmp_path.glob(f".*{TEMP_MARK}*"))
    batch = next(iter(open_loader(out / "shards", LoaderConfig(threads=1, hflip=False), 25, 0, CPU)))
    assert batch.images.shape == (25, 3, 32, 32)
    assert sorted(batch.labels.tolist()) == sorted([i % 10 for i in range(25)])


def test_both_exported_folders_are_valid_prepare_sources(checkpoint, tmp_path):
    out = _export(checkpoint, tmp_path / "out", n=30, shard_size=16).out_dir
    from_shards, _ = prepare(DataConfig(str(out / "shards")), tmp_path / "again-shards", progress=False)
    from_files, _ = prepare(DataConfig(str(out / "files")), tmp_path / "again-files", progress=False)
    for manifest in (from_shards, from_files):
        assert manifest.num_samples == 30 and not manifest.skipped
        assert manifest.class_histogram == {name: 3 for name in manifest.class_names}
    with tarfile.open(tmp_path / "again-shards" / "shard-000000.tar") as tar:
        passed = {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
    exported = {p.read_bytes() for p in (out / "files").rglob("*.jpg")}
    assert set(passed.values()) <= exported  # 32x32 JPEGs pass through prepare byte for byte


def test_seeds_reproduce_the_same_images_whatever_the_batch_or_range(checkpoint, tmp_path):
    G, info, z_dim = load_generator(load_checkpoint(checkpoint), ema=True, device=CPU)
    labels = torch.arange(6) % 10
    whole = generate(G, z_dim, list(range(100, 106)), labels, CPU)
    split = torch.cat([generate(G, z_dim, [100, 101], labels[:2], CPU),
                       generate(G, z_dim, [102, 103, 104, 105], labels[2:], CPU)])
    assert torch.equal(whole, split)
    assert whole.dtype == torch.uint8 and whole.shape == (6, 3, 32, 32)
    wide = _tree(_export(checkpoint, tmp_path / "wide", n=30, batch_size=7).files)
    part = _tree(_export(checkpoint, tmp_path / "part", n=10, seed=10, batch_size=4).files)
    assert len(part) == 10 and all(wide[name] == data for name, data in part.items())


def test_the_fast_generator_matches_the_network_as_trained(checkpoint):
    state = load_checkpoint(checkpoint)
    fast, _, z_dim = load_generator(state, ema=True, device=CPU)
    plain, _, _ = load_generator(state, ema=True, device=CPU, fast=False)
    def norms(module):
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())

    assert norms(fast) == norms(plain) - 3  # the three after transposed convolutions are folded into them
    z, labels = latents(list(range(50)), z_dim), torch.arange(50) % 10
    with torch.no_grad():
        assert torch.allclose(fast(z, labels), plain(z, labels), atol=1e-5)


def test_exported_jpeg_is_faithful_to_a_pil_encode(checkpoint, tmp_path):
    out = _export(checkpoint, tmp_path / "o", n=20, quality=95).out_dir
    G, _, z_dim = load_generator(load_checkpoint(checkpoint), ema=True, device=CPU, fast=False)
    pixels = generate(G, z_dim, list(range(20)), torch.arange(20) % 10, CPU).permute(0, 2, 3, 1).numpy()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    errors = []
    for seed, array in enumerate(pixels):
        reference = io.BytesIO()
        Image.fromarray(array).save(reference, "JPEG", quality=95)
        ours = np.asarray(Image.open(out / "files" / names[seed % 10] / f"seed{seed:07d}-c{seed % 10}-q95.jpg"))
        errors.append(np.abs(ours.astype(np.float32) - np.asarray(Image.open(reference), dtype=np.float32)).mean())
    assert max(errors) <= 1.0  # within 1/255 of Pillow's own encode of the plain generator's pixels


def test_jpeg_subsampling_png_level_and_lossless_webp_are_honoured(checkpoint, tmp_path):
    fine = _export(checkpoint, tmp_path / "444", n=2, jpeg_subsampling="4:4:4").files
    coarse = _export(checkpoint, tmp_path / "420", n=2).files
    assert JpegImagePlugin.get_sampling(Image.open(next(fine.rglob("*.jpg")))) == 0  # 4:4:4
    assert JpegImagePlugin.get_sampling(Image.open(next(coarse.rglob("*.jpg")))) == 2  # 4:2:0
    stored = _export(checkpoint, tmp_path / "png0", n=2, format="png", png_compress_level=0).files
    packed = _export(checkpoint, tmp_path / "png9", n=2, format="png", png_compress_level=9).files
    assert sum(map(len, _tree(stored).values())) > sum(map(len, _tree(packed).values()))
    lossless = _export(checkpoint, tmp_path / "webp", n=3, format="webp", webp_lossless=True)
    assert next(lossless.files.rglob("*.webp")).name.endswith("-q0.webp")  # no quality: lossless
    G, _, z_dim = load_generator(load_checkpoint(checkpoint), ema=True, device=CPU)
    pixels = generate(G, z_dim, [0], torch.tensor([0]), CPU)[0].permute(1, 2, 0).numpy()
    decoded = np.asarray(Image.open(lossless.files / "airplane" / "seed0000000-c0-q0.webp").convert("RGB"))
    assert np.array_equal(decoded, pixels)


def test_classes_as_names_or_per_class_counts(checkpoint, tmp_path):
    listed = _export(checkpoint, tmp_path / "o", n=6, classes=["cat", "ship"])
    assert sorted(p.parent.name for p in listed.files.glob("*/*.jpg")) == ["cat"] * 3 + ["ship"] * 3
    again = _export(checkpoint, tmp_path / "o", n=6, classes=["cat", "ship"])
    assert again.up_to_date
    counted = _export(checkpoint, tmp_path / "counts", classes={"dog": 4, "frog": 1})
    assert counted.n == 5
    assert sorted(p.name for p in counted.files.glob("*/*.jpg")) == [
        "seed0000000-c5-q95.jpg", "seed0000001-c5-q95.jpg", "seed0000002-c5-q95.jpg", "seed0000003-c5-q95.jpg",
        "seed0000004-c6-q95.jpg"]
    assert read_manifest(counted.shards).class_histogram["dog"] == 4
    with pytest.raises(ConfigError, match="export.n: 7 images, but the counts in export.classes add up to 5"):
        _export(checkpoint, tmp_path / "bad", n=7, classes={"dog": 4, "frog": 1})


def test_truncation_keeps_latents_in_bounds_and_is_recorded(checkpoint, tmp_path):
    z = latents(list(range(20)), 64, truncation=0.5)
    assert z.abs().max() <= 0.5 and torch.equal(z, latents(list(range(20)), 64, truncation=0.5))
    free = latents(list(range(20)), 64)
    inside = free.abs() <= 0.5
    assert torch.equal(z[inside], free[inside])  # only the components beyond the bound are redrawn
    out = _export(checkpoint, tmp_path / "t", n=3, truncation=0.5)
    with tarfile.open(out.shards / "shard-000000.tar") as tar:
        assert json.loads(tar.extractfile("00000000.json").read())["truncation"] == 0.5
    assert json.loads((out.out_dir / "export.json").read_text())["truncation"] == 0.5


def test_files_only_and_shards_only(checkpoint, tmp_path):
    files = _export(checkpoint, tmp_path / "f", n=4, output="files")
    assert files.shards is None and not (files.out_dir / "shards").exists()
    assert len(list(files.files.rglob("*.jpg"))) == 4
    shards = _export(checkpoint, tmp_path / "s", n=4, output="shards")
    assert shards.files is None and not (shards.out_dir / "files").exists()
    assert read_manifest(shards.shards).num_samples == 4
    assert sorted(p.name for p in shards.out_dir.iterdir()) == ["contact-sheet.png", "export.json", "shards"]


def test_an_export_that_fails_midway_resumes_from_its_finished_parts(checkpoint, tmp_path, monkeypatch):
    clean = _export(checkpoint, tmp_path / "clean", n=40, batch_size=5, shard_size=10).out_dir
    real_add = export_module._Part.add

    def fail_at_seed_25(self, seeds, labels, pixels):
        if 25 in seeds:
            raise OSError(errno.EIO, "simulated I/O error")
        return real_add(self, seeds, labels, pixels)

    monkeypatch.setattr(export_module._Part, "add", fail_at_seed_25)
    with pytest.raises(OSError, match="simulated"):
        _export(checkpoint, tmp_path / "out", n=40, batch_size=5, shard_size=10)
    work = tmp_path / "out" / WORK_NAME
    assert [p.name for p in (tmp_path / "out").iterdir()] == [WORK_NAME]  # nothing that looks complete
    assert sorted(p.name for p in (work / "shards").iterdir()) == [
        "shard-000000.idx", "shard-000000.tar", "shard-000001.idx", "shard-000001.tar"]  # the open shard is gone
    kept = (work / "shards" / "shard-000000.tar").stat().st_ino
    monkeypatch.setattr(export_module._Part, "add", real_add)
    _export(checkpoint, tmp_path / "out", n=40, batch_size=5, shard_size=10)
    assert (tmp_path / "out" / "shards" / "shard-000000.tar").stat().st_ino == kept  # not written again
    assert _without_records(_tree(tmp_path / "out")) == _without_records(_tree(clean))
    assert not work.exists()


def test_a_full_disk_is_explained_and_a_rerun_completes(checkpoint, tmp_path, monkeypatch):
    real_write = export_module._write_file

    def disk_full(path, data):
        if "seed0000012" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(export_module, "_write_file", disk_full)
    with pytest.raises(DataError, match=r"seed0000012.*no space left on the device.*rerun the same command"):
        _export(checkpoint, tmp_path / "out", n=20, shard_size=10)
    work = tmp_path / "out" / WORK_NAME
    assert sorted(p.name for p in (work / "shards").iterdir()) == ["shard-000000.idx", "shard-000000.tar"]
    monkeypatch.setattr(export_module, "_write_file", real_write)
    result = _export(checkpoint, tmp_path / "out", n=20, shard_size=10)
    assert read_manifest(result.shards).num_samples == 20 and len(list(result.files.rglob("*.jpg"))) == 20


def _generate_command(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cgan_pipe", "generate", str(checkpoint), str(out), "--seeds", "0-299",
            "--batch-size", "10", "--shard-size", "30", "--device", "cpu", "-q", *extra]


def test_torchrun_ranks_share_the_parts_and_rank_0_writes_one_manifest(checkpoint, tmp_path):
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={port}",
               *_generate_command(checkpoint, tmp_path / "out")[1:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("300 images") == 1  # rank 0 reports, once
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: other thread counts may round a pixel differently
    try:
        clean = _export(checkpoint, tmp_path / "clean", n=300, batch_size=10, shard_size=30).out_dir
    finally:
        torch.set_num_threads(threads)
    assert _without_records(_tree(tmp_path / "out")) == _without_records(_tree(clean))
    assert [s.sha256 for s in read_manifest(tmp_path / "out" / "shards").shards] == \
        [s.sha256 for s in read_manifest(clean / "shards").shards]


def test_bad_requests_fail_before_any_work(checkpoint, tmp_path):
    bad = [(dict(format="gif"), "export.format: must be one of jpeg, png, webp"),
           (dict(quality=0), "export.quality: must be between 1 and 100"),
           (dict(output="cloud"), "export.output: must be one of files, shards, both"),
           (dict(jpeg_subsampling="4:1:1"), "export.jpeg_subsampling: must be one of 4:2:0, 4:4:4"),
           (dict(png_compress_level=10), "export.png_compress_level: must be between 0 and 9"),
           (dict(truncation=0.01), "export.truncation: must be at least 0.05"),
           (dict(classes=["unicorn"]), "unknown 'unicorn'"), (dict(n=0), "export.n: must be > 0"),
           (dict(classes={"cat": 0}), "export.classes: every count must be > 0"),
           (dict(classes=[]), "export.classes: must not be empty")]
    for settings, message in bad:
        with pytest.raises(ConfigError, match=message):
            _export(checkpoint, tmp_path / "a", **settings)
    with pytest.raises(DataError, match="checkpoint not found"):
        _export(tmp_path / "none.pt", tmp_path / "a")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(DataError, match="notes.pt: not a checkpoint"):
        _export(tmp_path / "notes.pt", tmp_path / "a")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a*"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    (tmp_path / "busy" / "files").mkdir()  # named as an export's folder, but the user's
    for overwrite in (False, True):  # what cgan-pipe did not write is never replaced
        with pytest.raises(ConfigError, match=r"busy holds files cgan-pipe did not write \(files, mine.txt\); "
                                              r"export into a new folder"):
            export(checkpoint, tmp_path / "busy", _settings(n=2), device=CPU, progress=False, overwrite=overwrite)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["files", "mine.txt"]
    (tmp_path / "a-file").write_text("keep me")
    with pytest.raises(ConfigError, match="a-file is a file; give a folder"):
        _export(checkpoint, tmp_path / "a-file", n=2)
    earlier = _export(checkpoint, tmp_path / "earlier", n=2)
    with pytest.raises(ConfigError, match=r"holds an export made with other settings \(n, quality differ\).*"
                                          r"--overwrite to replace it"):
        _export(checkpoint, tmp_path / "earlier", n=3, quality=80)
    assert len(list(earlier.files.rglob("*.jpg"))) == 2  # the earlier export is untouched
    replaced = export(checkpoint, tmp_path / "earlier", _settings(n=3, quality=80), device=CPU, progress=False,
                      overwrite=True)
    assert len(list(replaced.files.rglob("*.jpg"))) == 3 and read_manifest(replaced.shards).num_samples == 3


@pytest.mark.parametrize("n", [10**12, 10**14])
def test_more_images_than_memory_can_count_are_refused_before_any_work(checkpoint, tmp_path, n):
    with pytest.raises(ConfigError, match=rf"export.n: {n:,} images .* would need [\d,.]+ GiB of memory just for "
                                          r"their class ids, more than the [\d,.]+ GiB free"):
        _export(checkpoint, tmp_path / "out", n=n)
    assert not (tmp_path / "out").exists()


def test_more_images_than_the_disk_can_hold_are_refused_before_any_work(checkpoint, tmp_path, monkeypatch):
    real = os.statvfs
    small = lambda path: os.statvfs_result((*real(path)[:4], 100, *real(path)[5:]))  # noqa: E731  100 blocks free
    monkeypatch.setattr(os, "statvfs", small)
    with pytest.raises(ConfigError, match=r"export.n: 1,000 images .* into .*out need at least [\d.]+ GiB, where "
                                          r"[\d.]+ GiB are free; export fewer, or into a larger file system"):
        _export(checkpoint, tmp_path / "out", n=1000)
    assert not (tmp_path / "out").exists()


def test_class_names_from_a_tampered_checkpoint_cannot_write_outside_the_export(checkpoint, tmp_path):
    state = load_checkpoint(checkpoint)
    state["dataset"]["class_names"][3] = "../../escaped"
    tampered = tmp_path / "tampered.pt"
    torch.save(state, tampered)
    with pytest.raises(DataError, match=r"tampered.pt: class name '../../escaped' cannot be a folder name"):
        _export(tampered, tmp_path / "out" / "export", n=10)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()
    shards = _export(tampered, tmp_path / "out" / "export", n=10, output="shards")  # names stay in the metadata
    assert read_manifest(shards.shards).class_histogram["../../escaped"] == 1


def test_a_quality_conditioned_model_exports_the_requested_quality_and_records_it(quality_checkpoint, tmp_path):
    asked = _export(quality_checkpoint, tmp_path / "q10", n=4, quality_cond=10)
    assert (asked.files / "airplane" / "seed0000000-c0-q95-qc10.jpg").exists()
    with tarfile.open(asked.shards / "shard-000000.tar") as tar:
        assert json.loads(tar.extractfile("00000001.json").read())["quality_cond"] == 10
    default = _export(quality_checkpoint, tmp_path / "top", n=4)
    assert (default.files / "airplane" / "seed0000000-c0-q95-qc90.jpg").exists()  # the highest trained quality
    low = Image.open(asked.files / "airplane" / "seed0000000-c0-q95-qc10.jpg")
    top = Image.open(default.files / "airplane" / "seed0000000-c0-q95-qc90.jpg")
    assert np.asarray(low).tobytes() != np.asarray(top).tobytes()


def test_asking_for_a_quality_the_model_cannot_give_is_refused_before_any_work(checkpoint, quality_checkpoint,
                                                                              tmp_path):
    with pytest.raises(ConfigError, match=r"trained without quality conditioning \(compression.mode: none\).*"
                                          r"leave out --quality-cond"):
        _export(checkpoint, tmp_path / "a", n=2, quality_cond=10)
    for bad in (0, 101):
        with pytest.raises(ConfigError, match=fr"export.quality_cond: must be between 1 and 100 \(got {bad}\)"):
            _export(quality_checkpoint, tmp_path / "a", n=2, quality_cond=bad)
    assert not (tmp_path / "a").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG encode)")
def test_gpu_export_encodes_with_nvjpeg_faithfully(checkpoint, tmp_path):
    cuda = torch.device("cuda")
    out = export(checkpoint, tmp_path / "gpu", _settings(n=20), device=cuda, progress=False)
    G, _, z_dim = load_generator(load_checkpoint(checkpoint), ema=True, device=cuda)
    pixels = generate(G, z_dim, list(range(20)), torch.arange(20) % 10, cuda).permute(0, 2, 3, 1).cpu().numpy()
    for seed, array in enumerate(pixels):
        reference = Image.open(io.BytesIO(images.encode(array, "jpeg", 95)))
        ours = Image.open(next(out.files.glob(f"*/seed{seed:07d}-*.jpg")))
        assert np.abs(np.asarray(ours, dtype=np.float32) - np.asarray(reference, dtype=np.float32)).mean() <= 1.0

"""prepare: shard contents, DALI index, manifest, pass-through, re-encoding, bad images, reruns."""

from __future__ import annotations

from dataclasses import replace
import io
import json
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from cgan_pipe.compression import estimate_jpeg_quality
from cgan_pipe.config import DataConfig, LoaderConfig, config_from_dict
from cgan_pipe.data.loader import open_loader
from cgan_pipe.data.manifest import read_manifest
from cgan_pipe.data.digest import file_sha256
from cgan_pipe.data.shard_format import ShardSample, ShardWriter, dali_index
from cgan_pipe.data.shards import merge_shards, prepare
from cgan_pipe.data.verify import verify_shards
from cgan_pipe.errors import ConfigError, DataError

from conftest import CLASSES, cifar_members, write_tar


def read_samples(shard: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_manifest_lists_complete_shards_with_counts_and_checksums(small_shards):
    manifest = read_manifest(small_shards)
    assert [s.samples for s in manifest.shards] == [120, 80]
    assert manifest.num_samples == 200
    assert manifest.class_names == CLASSES
    assert manifest.class_histogram == {c: 20 for c in CLASSES}
    assert manifest.quality_histogram == {"75": 200}  # the shared JPEGs are libjpeg q75
    assert manifest.skipped == []
    for shard in manifest.shards:
        assert file_sha256(small_shards / shard.tar) == shard.sha256
        assert (small_shards / shard.tar).stat().st_size == shard.bytes
    on_disk = json.loads((small_shards / "manifest.json").read_text())
    assert on_disk["num_samples"] == 200 and on_disk["settings"]["shard_size"] == 120


def test_jpegs_at_size_pass_through_byte_for_byte_with_their_labels(small_shards, small_tar):
    originals = cifar_members("test", 20)
    seen = 0
    for shard in sorted(small_shards.glob("shard-*.tar")):
        for key, sample in read_samples(shard).items():
            meta = json.loads(sample["json"])
            assert sample["jpg"] == originals[meta["source"]]
            assert int(sample["cls"].decode()) == CLASSES.index(meta["source"].split("/")[1])
            assert meta["quality"] == 75 and meta["reencoded"] is False
            seen += 1
    assert seen == 200


def test_dali_index_matches_dalis_own_wds2idx(small_shards, tmp_path):
    shard = small_shards / "shard-000000.tar"
    tool = Path(sys.executable).with_name("wds2idx")
    subprocess.run([str(tool), str(shard), str(tmp_path / "ref.idx")], check=True, capture_output=True)
    assert (small_shards / "shard-000000.idx").read_text() == (tmp_path / "ref.idx").read_text()
    assert dali_index(shard).startswith("v1.2 120\n")


def test_shards_are_written_in_ustar_format(small_shards):
    with open(small_shards / "shard-000000.tar", "rb") as handle:
        header = handle.read(512)
    assert header[257:263] == b"ustar\x00"


def test_rerun_is_a_no_op_and_same_settings_give_identical_bytes(small_tar, small_shards, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in small_shards.iterdir()}
    manifest, up_to_date = prepare(DataConfig(str(small_tar), shard_size=120), small_shards, progress=False)
    assert up_to_date and {p.name: p.stat().st_mtime_ns for p in small_shards.iterdir()} == before
    again, up_to_date = prepare(DataConfig(str(small_tar), shard_size=120), tmp_path, progress=False)
    assert not up_to_date
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]


def test_changed_settings_rebuild_and_remove_stale_shards(small_tar, tmp_path):
    prepare(DataConfig(str(small_tar), shard_size=50), tmp_path, progress=False)
    assert len(list(tmp_path.glob("shard-*.tar"))) == 4
    (tmp_path / ".shard-000009.tar.tmp-123").write_bytes(b"partial")  # left by a killed run
    manifest, up_to_date = prepare(DataConfig(str(small_tar), shard_size=150), tmp_path, progress=False)
    assert not up_to_date and len(manifest.shards) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json", "shard-000000.idx", "shard-000000.tar", "shard-000001.idx", "shard-000001.tar"]


def test_prepare_never_replaces_or_deletes_files_it_did_not_write(small_tar, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"the user's own tar")
    (out / "shard-000001.notes.txt").write_text("the user's notes")
    (out / "shard-000099.tar").write_bytes(b"another of the user's tars, where no shard of this set goes")
    with pytest.raises(ConfigError, match=r"out/shard-000000.tar: a file cgan-pipe did not write .* is where prepare "
                                          r"would write a shard; prepare into another folder, or move it away"):
        prepare(DataConfig(str(small_tar), shard_size=50), out, progress=False)
    assert (out / "shard-000000.tar").read_bytes() == b"the user's own tar"
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.notes.txt", "shard-000099.tar"]
    (out / "shard-000000.tar").rename(tmp_path / "moved.tar")
    prepare(DataConfig(str(small_tar), shard_size=50), out, progress=False)
    rebuilt, _ = prepare(DataConfig(str(small_tar), shard_size=150), out, progress=False)  # other settings
    assert len(rebuilt.shards) == 2 and not (out / "shard-000002.tar").exists()  # its own stale shards go
    assert (out / "shard-000001.notes.txt").read_text() == "the user's notes"
    assert (out / "shard-000099.tar").read_bytes().startswith(b"another of the user's tars")


def test_prepare_leaves_a_manifest_it_did_not_write_alone(small_tar, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"project": "someone else\'s"}')
    with pytest.raises(ConfigError, match=r"out/manifest.json: not a manifest cgan-pipe wrote"):
        prepare(DataConfig(str(small_tar), shard_size=50), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


def test_a_rebuild_killed_midway_still_knows_its_old_shards_for_its_own(small_tar, tmp_path):
    prepare(DataConfig(str(small_tar), shard_size=50), tmp_path, progress=False)
    (tmp_path / "shard-000001.tar").unlink()  # a rebuild was killed after deleting some of the old set
    (tmp_path / "shard-000001.idx").unlink()
    rebuilt, _ = prepare(DataConfig(str(small_tar), shard_size=100), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json", "shard-000000.idx", "shard-000000.tar", "shard-000001.idx", "shard-000001.tar"]


@pytest.mark.parametrize("inside", ["imgs/shards", "imgs", "imgs/cat/deeper"])
def test_an_output_inside_the_source_is_refused(tmp_path, inside):
    source = tmp_path / "imgs"
    for name, data in list(cifar_members("test", 2).items()):
        (source / name.split("/")[-2]).mkdir(parents=True, exist_ok=True)
        (source / name.split("/")[-2] / name.split("/")[-1]).write_bytes(data)
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    with pytest.raises(ConfigError, match=rf"{inside} is inside the source .*imgs: its shards would become inputs "
                                          rf"of the next prepare; write them to a folder outside"):
        prepare(DataConfig(str(source)), tmp_path / inside, progress=False)
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before  # nothing written into the source
    manifest, _ = prepare(DataConfig(str(source)), tmp_path / "beside", progress=False)
    assert manifest.num_samples == 20


@pytest.mark.parametrize("fmt,ext", [("png", "png"), ("webp", "webp"), ("jpeg", "jpg")])
def test_resize_and_reencode(small_tar, tmp_path, fmt, ext):
    settings = DataConfig(str(small_tar), resolution=16, format=fmt, quality=60, limit=12)
    manifest, _ = prepare(settings, tmp_path, progress=False)
    assert manifest.num_samples == 12 and manifest.image_format == fmt
    for sample in read_samples(tmp_path / "shard-000000.tar").values():
        image = Image.open(io.BytesIO(sample[ext]))
        assert image.size == (16, 16) and image.mode == "RGB"
        meta = json.loads(sample["json"])
        assert meta["reencoded"] is True and (meta["width"], meta["height"]) == (32, 32)
        if fmt == "jpeg":
            assert estimate_jpeg_quality(image.quantization) == 60 == meta["quality"]
        elif fmt == "png":
            assert meta["quality"] is None


def test_reencode_sends_jpegs_at_size_through_the_encoder(small_tar, tmp_path):
    settings = DataConfig(str(small_tar), quality=90, reencode=True, limit=20)
    prepare(settings, tmp_path, progress=False)
    for sample in read_samples(tmp_path / "shard-000000.tar").values():
        meta = json.loads(sample["json"])
        assert meta["reencoded"] is True and meta["quality"] == 90
        assert estimate_jpeg_quality(Image.open(io.BytesIO(sample["jpg"])).quantization) == 90


def test_shard_bytes_sizes_shards_near_the_target_and_stays_deterministic(small_tar, tmp_path):
    settings = DataConfig(str(small_tar), shard_bytes="60000")
    manifest, _ = prepare(settings, tmp_path / "a", progress=False)
    assert len(manifest.shards) > 3 and manifest.num_samples == 200
    for shard in manifest.shards[:-1]:  # the last one holds what is left
        assert 0.8 * 60_000 <= shard.bytes <= 1.2 * 60_000
    again, _ = prepare(replace(settings, workers=2), tmp_path / "b", progress=False)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]


def test_the_progress_bar_counts_every_image_written_by_the_workers(small_tar, tmp_path, capsys):
    prepare(DataConfig(str(small_tar), shard_size=60, workers=2), tmp_path, progress=True)
    assert "200/200" in capsys.readouterr().err


def test_bad_images_are_skipped_with_reasons(tmp_path):
    members = cifar_members("test", 3)
    good = next(iter(members.values()))
    members["test/cat/truncated.jpg"] = good[: len(good) // 2]
    members["test/cat/empty.jpg"] = b""
    members["test/dog/not-an-image.png"] = b"hello, world"
    source = write_tar(tmp_path / "mixed.tar", members)
    manifest, _ = prepare(DataConfig(str(source)), tmp_path / "out", progress=False)
    assert manifest.num_samples == 30
    assert {s["source"]: s["reason"] for s in manifest.skipped} == {
        "test/cat/empty.jpg": "empty file",
        "test/cat/truncated.jpg": "cannot decode: JPEG data: Truncated File Read",
        "test/dog/not-an-image.png": "not an image: text file"}
    assert manifest.inputs == {"files": 33, "kept": 30, "skipped": 3, "beyond_limit": 0}


def test_a_source_with_no_usable_image_is_an_error(tmp_path):
    source = write_tar(tmp_path / "bad.tar", {"x/a/1.jpg": b"junk", "x/b/2.jpg": b"junk"})
    with pytest.raises(DataError, match=r"none of its 2 files could be used \(2 not an image; "
                                        r"e.g. x/./.\.jpg: not an image: text file\)"):
        prepare(DataConfig(str(source)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_an_unreadable_source_leaves_existing_shards_alone(small_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_shards, copy)
    with pytest.raises(DataError, match="does not exist"):
        prepare(DataConfig(str(tmp_path / "typo.tar"), shard_size=120), copy, progress=False)
    assert read_manifest(copy).num_samples == 200


def test_missing_shard_makes_the_manifest_unusable(small_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_shards, copy)
    (copy / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match="shard-000001.tar.*missing"):
        read_manifest(copy)


def test_a_shard_interrupted_mid_write_never_gets_a_final_name(tmp_path):
    image = next(iter(cifar_members("test", 1).values()))
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, shard_size=2) as writer:
            for i in range(3):  # the first shard completes, the second is cut off
                writer.add(ShardSample(f"{i:08d}", image, "jpg", 0, {"source": "x"}))
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.idx", "shard-000000.tar"]
    assert dali_index(tmp_path / "shard-000000.tar").startswith("v1.2 2\n")


def test_the_number_of_workers_does_not_change_the_shards(small_tar, tmp_path):
    one, _ = prepare(DataConfig(str(small_tar), shard_size=30, workers=1), tmp_path / "one", progress=False)
    two, _ = prepare(DataConfig(str(small_tar), shard_size=30, workers=2), tmp_path / "two", progress=False)
    assert len(one.shards) == 7
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]
    assert one.class_histogram == two.class_histogram and one.skipped == two.skipped == []
    assert not list((tmp_path / "two").glob(".*"))  # no plan, done records or temps left behind


def test_keep_copies_rgb_images_at_size_and_writes_the_rest_as_png(tmp_path):
    jpeg = cifar_members("test", 1)["test/cat/0000.jpg"]
    rgb = Image.open(io.BytesIO(jpeg)).convert("RGB")

    def save(image, fmt):
        out = io.BytesIO()
        image.save(out, fmt)
        return out.getvalue()

    files = {"d/cat/a.jpg": jpeg, "d/cat/b.png": save(rgb, "PNG"), "d/dog/c.webp": save(rgb, "WEBP"),
             "d/dog/grey.png": save(rgb.convert("L"), "PNG"), "d/dog/big.jpg": save(rgb.resize((48, 48)), "JPEG")}
    source = write_tar(tmp_path / "s.tar", files)
    manifest, _ = prepare(DataConfig(str(source), format="keep"), tmp_path / "o", progress=False)
    samples = {json.loads(s["json"])["source"]: s for s in read_samples(tmp_path / "o" / "shard-000000.tar").values()}
    assert samples["d/cat/a.jpg"]["jpg"] == jpeg
    assert samples["d/cat/b.png"]["png"] == files["d/cat/b.png"]
    assert samples["d/dog/c.webp"]["webp"] == files["d/dog/c.webp"]
    for name in ("d/dog/grey.png", "d/dog/big.jpg"):
        assert json.loads(samples[name]["json"])["reencoded"] is True
        assert Image.open(io.BytesIO(samples[name]["png"])).size == (32, 32)
    assert manifest.image_format == "keep" and verify_shards(tmp_path / "o").ok
    batch = next(iter(open_loader(tmp_path / "o", LoaderConfig(threads=1), 5, 0, torch.device("cpu"))))
    assert batch.images.shape == (5, 3, 32, 32) and sorted(batch.labels.tolist()) == [0, 0, 1, 1, 1]


def _one_image_tar(tmp_path, image: Image.Image, name: str = "d/cat/x.png") -> Path:
    out = io.BytesIO()
    image.save(out, "PNG")
    dog = cifar_members("test", 1)["test/dog/0000.jpg"]
    return write_tar(tmp_path / "one.tar", {name: out.getvalue(), "d/dog/y.jpg": dog})


def _only_sample(out_dir: Path, source: str) -> dict[str, bytes]:
    for sample in read_samples(out_dir / "shard-000000.tar").values():
        if json.loads(sample["json"])["source"] == source:
            return sample
    raise AssertionError(f"{source} not in the shard")


def test_resize_policies_pad_and_reject(tmp_path):
    wide = Image.new("RGB", (64, 32), (200, 30, 30))
    source = str(_one_image_tar(tmp_path, wide))
    prepare(DataConfig(source, resize="pad", format="png"), tmp_path / "pad", progress=False)
    padded = np.asarray(Image.open(io.BytesIO(_only_sample(tmp_path / "pad", "d/cat/x.png")["png"])))
    assert padded.shape == (32, 32, 3)
    assert padded[0].max() == 0 and padded[-1].max() == 0  # black bars above and below
    assert abs(int(padded[16, 16, 0]) - 200) <= 2  # the picture itself in the middle
    manifest, _ = prepare(DataConfig(source, resize="reject"), tmp_path / "rej", progress=False)
    assert manifest.num_samples == 1
    assert manifest.skipped == [{"source": "d/cat/x.png", "kind": "wrong size",
                                 "reason": "wrong size: 64x32 is not 32x32 (resize policy 'reject')"}]


def test_encoder_options(tmp_path):
    image = Image.open(io.BytesIO(cifar_members("test", 1)["test/frog/0000.jpg"])).convert("RGB")
    source = str(_one_image_tar(tmp_path, image))
    prepare(DataConfig(source, jpeg_subsampling="4:4:4", quality=90), tmp_path / "j", progress=False)
    jpeg = Image.open(io.BytesIO(_only_sample(tmp_path / "j", "d/cat/x.png")["jpg"]))
    assert JpegImagePlugin.get_sampling(jpeg) == 0  # 4:4:4
    prepare(DataConfig(source, format="webp", webp_lossless=True), tmp_path / "w", progress=False)
    sample = _only_sample(tmp_path / "w", "d/cat/x.png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["webp"])).convert("RGB")), np.asarray(image))
    assert json.loads(sample["json"])["quality"] is None
    sizes = {}
    for level in (0, 9):
        prepare(DataConfig(source, format="png", png_compress_level=level), tmp_path / f"p{level}", progress=False)
        sizes[level] = len(_only_sample(tmp_path / f"p{level}", "d/cat/x.png")["png"])
    assert sizes[0] > sizes[9]


def test_multi_quality_writes_each_image_once_per_quality(small_tar, tmp_path):
    settings = DataConfig(str(small_tar), qualities=[10, 50, 90], shard_size=30, limit=20)
    manifest, _ = prepare(settings, tmp_path, progress=False)
    assert manifest.num_samples == 60 and [s.samples for s in manifest.shards] == [30, 30]
    assert manifest.quality_histogram == {"10": 20, "50": 20, "90": 20}
    by_source: dict[str, list[int]] = {}
    for shard in manifest.shards:
        for key, sample in read_samples(tmp_path / shard.tar).items():
            meta = json.loads(sample["json"])
            assert estimate_jpeg_quality(Image.open(io.BytesIO(sample["jpg"])).quantization) == meta["quality"]
            assert int(key) % 3 == [10, 50, 90].index(meta["quality"])  # key = input position * 3 + variant
            by_source.setdefault(meta["source"], []).append(meta["quality"])
    assert len(by_source) == 20 and all(sorted(q) == [10, 50, 90] for q in by_source.values())
    again, up_to_date = prepare(settings, tmp_path, progress=False)
    assert up_to_date


def test_random_quality_mode_is_seeded_and_worker_independent(small_tar, tmp_path):
    settings = DataConfig(str(small_tar), qualities=[10, 30, 50, 75, 95], quality_mode="random", shard_size=40)
    one, _ = prepare(replace(settings, workers=1), tmp_path / "a", progress=False)
    two, _ = prepare(replace(settings, workers=2), tmp_path / "b", progress=False)
    assert one.num_samples == 200 and len(one.quality_histogram) == 5
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]


def test_several_qualities_need_a_lossy_format():
    with pytest.raises(ConfigError, match="data.qualities: several qualities need a lossy format"):
        config_from_dict({"name": "t", "data": {"source": "x", "format": "png", "qualities": [10, 20]}})


def test_ranks_write_their_own_shards_and_merge_into_one_set(small_tar, tmp_path):
    settings = DataConfig(str(small_tar), shard_size=30)
    single, _ = prepare(settings, tmp_path / "single", progress=False)
    out = tmp_path / "ranks"
    manifest, _ = prepare(settings, out, rank=1, world_size=2, progress=False)
    assert manifest is None
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000001.tar", "shard-000003.tar",
                                                               "shard-000005.tar"]
    with pytest.raises(DataError, match="4 of 7 shards are not written yet"):
        merge_shards(out)
    prepare(settings, out, rank=0, world_size=2, progress=False)  # leaves rank 1's shards be
    merged = merge_shards(out)
    assert [s.sha256 for s in merged.shards] == [s.sha256 for s in single.shards]
    assert merged.settings == single.settings and merged.num_samples == 200
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    with pytest.raises(ConfigError, match="rank 2 is not in 0..1"):
        prepare(settings, out, rank=2, world_size=2, progress=False)


def test_under_torchrun_the_ranks_split_the_work_and_rank_0_writes_the_manifest(small_tar, tmp_path):
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={port}",
               "-m", "cgan_pipe", "prepare", str(small_tar), str(tmp_path / "out"), "--shard-size", "30",
               "--workers", "1", "-q"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("200 samples in 7 shards") == 1  # rank 0 reports, once
    single, _ = prepare(DataConfig(str(small_tar), shard_size=30), tmp_path / "single", progress=False)
    assert [s.sha256 for s in read_manifest(tmp_path / "out").shards] == [s.sha256 for s in single.shards]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        sorted(p.name for p in (tmp_path / "single").iterdir())
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr

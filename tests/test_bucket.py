"""Shard sets in an S3 bucket, against a real S3-compatible server on 127.0.0.1 (conftest.s3_server): prepare,
verify, inspect, both loaders, training and generate, resumable uploads, and the errors a user meets."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch
from click.testing import CliRunner

from cgan_pipe.cli import main
from cgan_pipe.config import DataConfig, LoaderConfig
from cgan_pipe.data.bucket import object_sizes, staging_dir, upload_file
from cgan_pipe.data.bucket_parts import BucketParts
from cgan_pipe.data.loader import open_loader
from cgan_pipe.data.manifest import read_manifest, read_remote_manifest
from cgan_pipe.data.shards import merge_shards, prepare
from cgan_pipe.errors import ConfigError, DataError

from conftest import S3_SECRET, start_s3_server

CLI = str(Path(sys.executable).with_name("cgan-pipe"))


def contents(url: str) -> dict[str, str]:
    """Every object under `url` by relative name, with the sha256 of its bytes."""
    fs = fsspec.filesystem("s3")
    key = url.removeprefix("s3://")
    fs.invalidate_cache()
    return {name.removeprefix(key + "/"): hashlib.sha256(fs.cat_file(name)).hexdigest()
            for name in fs.find(key)}


def copy_to_bucket(folder: Path, url: str) -> None:
    """Upload the shard set in `folder` to `url`, its manifest last."""
    files = sorted(folder.iterdir(), key=lambda path: path.name == "manifest.json")
    for path in files:
        upload_file(path, f"{url}/{path.name}")


def folder_contents(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bucket_shards(s3_server, small_shards, tmp_path_factory):
    """small_shards' source prepared straight into a bucket (the same settings): its URL."""
    fs = fsspec.filesystem("s3")
    fs.mkdir("prepared")
    url = "s3://prepared/cifar/shards"
    manifest = read_manifest(small_shards)
    result = CliRunner().invoke(main, ["prepare", manifest.source, url, "--shard-size", "120", "-q"])
    assert result.exit_code == 0, result.output
    return url


def test_prepare_writes_the_same_shard_set_into_a_bucket_and_a_rerun_does_nothing(bucket_shards, small_shards):
    assert contents(bucket_shards) == folder_contents(small_shards)
    assert not staging_dir(bucket_shards).exists()  # the local copy is gone once the bucket is complete
    again = CliRunner().invoke(main, ["prepare", read_manifest(small_shards).source, bucket_shards + "/",
                                      "--shard-size", "120"])
    assert again.exit_code == 0 and "already complete for these settings" in again.output
    assert f"-> {bucket_shards}/manifest.json" in again.output


def test_verify_and_inspect_read_the_bucket(bucket_shards, tmp_path):
    result = CliRunner().invoke(main, ["verify", bucket_shards])
    assert result.exit_code == 0, result.output
    assert f"{bucket_shards}: 200 samples in 2 shards: ok" in result.output
    sheet = tmp_path / "sheet.png"
    result = CliRunner().invoke(main, ["inspect", bucket_shards, "--json", "--sheet", str(sheet)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["samples"] == 200 and summary["path"] == bucket_shards and sheet.stat().st_size > 0
    no_sheet = CliRunner().invoke(main, ["inspect", bucket_shards])
    assert no_sheet.exit_code == 2 and "give --sheet PATH" in no_sheet.output


@pytest.mark.parametrize("backend,reads", [("dali", "shards"), ("dali", "samples"), ("torch", "shards")])
def test_each_loader_reads_every_sample_of_a_bucket_once_per_epoch(bucket_shards, backend, reads):
    manifest = read_remote_manifest(bucket_shards)
    cfg = LoaderConfig(backend=backend, bucket_reads=reads, threads=1, hflip=False)
    loader = open_loader(bucket_shards, cfg, 48, 0, torch.device("cpu"), with_quality=True)
    assert loader.samples_per_epoch == 200
    batches = iter(loader)
    for _ in range(2):  # two epochs, each of every sample once
        labels, sizes = collections.Counter(), []
        while sum(sizes) < 200:
            batch = next(batches)
            sizes.append(len(batch.labels))
            labels.update(batch.labels.tolist())
            assert batch.images.shape[1:] == (3, 32, 32) and -1 <= batch.images.min() and batch.images.max() <= 1
            assert batch.quality is not None and bool(((batch.quality > 0) & (batch.quality <= 1)).all())
        assert sizes == [48, 48, 48, 48, 8]  # the epoch's last batch is the rest
        assert {manifest.class_names[k]: v for k, v in labels.items()} == manifest.class_histogram


def test_bench_loader_times_both_backends_on_a_bucket(bucket_shards, tmp_path):
    out = tmp_path / "loader.json"
    result = CliRunner().invoke(main, ["bench", "loader", bucket_shards, "--batch-size", "16", "--batches", "3",
                                       "--set", "loader.threads=1", "--set", "loader.bucket_cache_mb=1",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert f"baseline: left out, it reads shard folders only, not {bucket_shards}" in result.output
    assert {(r["backend"], r["device"]) for r in json.loads(out.read_text())} == {("dali", "cpu"), ("torch", "cpu")}
    bad = CliRunner().invoke(main, ["bench", "loader", bucket_shards, "--set", "loader.bucket_cache=1"])
    assert bad.exit_code == 2 and "--set loader.bucket_cache: unknown key 'bucket_cache' (did you mean " \
        "'bucket_cache_mb'?)" in bad.output, bad.output
    bad = CliRunner().invoke(main, ["bench", "loader", bucket_shards, "--set", "train.steps=1"])
    assert bad.exit_code == 2 and "unknown key 'train'" in bad.output, bad.output


def test_a_bucket_read_gives_the_images_a_folder_read_gives(bucket_shards, small_shards):
    def images_by_label(shards):
        cfg = LoaderConfig(backend="dali", threads=1, hflip=False)
        batch = next(iter(open_loader(shards, cfg, 200, 0, torch.device("cpu"))))
        return sorted((int(label), round(float(image.sum()), 2)) for image, label in zip(batch.images, batch.labels))

    assert images_by_label(bucket_shards) == images_by_label(small_shards)


def test_train_and_generate_with_a_bucket(bucket_shards, bucket, tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"name: t\nrun_dir: {tmp_path / 'run'}\ndata:\n  source: unused\nloader:\n  threads: 1\n"
                        f"model:\n  z_dim: 16\n  g_width: 32\n  d_width: 32\ntrain:\n  steps: 2\n  batch_size: 16\n"
                        f"  log_every: 1\n  sample_every: 2\n  checkpoint_every: 2\n  device: cpu\n")
    result = CliRunner().invoke(main, ["train", str(pipeline), "--set", f"loader.shards={bucket_shards}"])
    assert result.exit_code == 0, result.output
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("*.pt"))
    out = f"{bucket}/generated"
    result = CliRunner().invoke(main, ["generate", str(checkpoint), out, "--n", "30", "--output", "both",
                                       "--shard-size", "20", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["export_shards"] == f"{out}/shards"
    local = tmp_path / "generated"
    result = CliRunner().invoke(main, ["generate", str(checkpoint), str(local), "--n", "30", "--output", "both",
                                       "--shard-size", "20", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert contents(out) == folder_contents(local)  # the same export, byte for byte
    again = CliRunner().invoke(main, ["generate", str(checkpoint), out, "--n", "30", "--output", "both",
                                      "--shard-size", "20", "--device", "cpu"])
    assert "already complete for these settings" in again.output
    other = CliRunner().invoke(main, ["generate", str(checkpoint), out, "--n", "20", "--device", "cpu"])
    assert other.exit_code == 2 and "holds an export made with other settings" in other.output
    loader = open_loader(f"{out}/shards", LoaderConfig(backend="torch", threads=1), 10, 0, torch.device("cpu"))
    assert loader.samples_per_epoch == 30
    fewer = ["generate", str(checkpoint), out, "--n", "20", "--device", "cpu", "--overwrite"]
    assert CliRunner().invoke(main, fewer).exit_code == 0
    assert CliRunner().invoke(main, [*fewer[:2], str(tmp_path / "fewer"), *fewer[3:]]).exit_code == 0
    assert contents(out) == folder_contents(tmp_path / "fewer")  # nothing of the export it replaced is left
    fsspec.filesystem("s3").pipe_file(f"{out}/notes.txt", b"mine")
    foreign = CliRunner().invoke(main, [*fewer[:3], "--n", "10", "--overwrite"])
    assert foreign.exit_code == 2 and "holds objects cgan-pipe did not write (notes.txt)" in foreign.output
    before = contents(bucket_shards)
    into_a_set = CliRunner().invoke(main, [*fewer[:2], bucket_shards, "--n", "10", "--overwrite"])
    assert into_a_set.exit_code == 2 and "holds objects cgan-pipe did not write (manifest.json" in into_a_set.output
    assert contents(bucket_shards) == before


def test_an_upload_cut_short_resumes_to_the_bucket_an_uninterrupted_run_gives(bucket, small_tar, monkeypatch):
    whole = f"{bucket}/whole"
    prepare(DataConfig(str(small_tar), shard_size=20), whole, progress=False)
    # What a killed upload can leave: finished parts with their records, a shard uploaded without its record,
    # written parts waiting in the staging folder, an older object under a shard's name, an unfinished
    # multipart upload, and no manifest.
    cut = f"{bucket}/cut"
    shipped = []
    ship = BucketParts.ship

    def ship_then_die(self, local, number, record, plan):
        if len(shipped) == 3:
            upload_file(local / record["shard"]["tar"], f"{self.url}/{record['shard']['tar']}")
            raise DataError("killed")
        shipped.append(number)
        ship(self, local, number, record, plan)

    monkeypatch.setattr(BucketParts, "ship", ship_then_die)
    with pytest.raises(DataError, match="killed"):
        prepare(DataConfig(str(small_tar), shard_size=20, workers=2), cut, progress=False)
    monkeypatch.undo()
    names = object_sizes(cut)
    assert ".prepare-plan.json" in names and "manifest.json" not in names
    assert sum(name.endswith(".done.json") for name in names) == 3
    assert sorted(p.name for p in staging_dir(cut).glob("shard-*.tar"))  # written, not uploaded
    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{cut}/shard-000009.tar", b"an older shard")
    key = f"{cut.removeprefix('s3://').split('/', 1)[1]}/shard-000008.tar"
    fs.call_s3("create_multipart_upload", Bucket=bucket.removeprefix("s3://"), Key=key)
    prepare(DataConfig(str(small_tar), shard_size=20), cut, progress=False)
    assert contents(cut) == contents(whole)
    assert not _unfinished_uploads(bucket)
    assert not staging_dir(cut).exists()


def test_prepare_into_a_bucket_holds_at_most_its_scratch_on_local_disk(bucket, small_tar, monkeypatch):
    url = f"{bucket}/bounded"
    held = []
    ship = BucketParts.ship

    def measured(self, local, number, record, plan):
        held.append(sum(p.stat().st_size for p in local.glob("shard-*")))
        ship(self, local, number, record, plan)

    monkeypatch.setattr(BucketParts, "ship", measured)
    # about 18 KB a shard of 10: room for three
    manifest, _ = prepare(DataConfig(str(small_tar), shard_size=10, workers=2, upload_scratch="60kB"), url,
                          progress=False)
    assert len(manifest.shards) == 20 and len(held) == 20
    assert max(held) <= 60_000 * 1.3  # shards are estimated from 256 images before any is written
    with pytest.raises(ConfigError, match="data.upload_scratch: 10kB is less than one shard"):
        prepare(DataConfig(str(small_tar), shard_size=10, upload_scratch="10kB", limit=150), url, progress=False)


def test_a_missing_or_changed_shard_is_named(bucket, small_shards):
    url = f"{bucket}/set"
    copy_to_bucket(small_shards, url)
    fs = fsspec.filesystem("s3")
    data = bytearray(fs.cat_file(f"{url}/shard-000000.tar"))
    data[-2000] ^= 0xFF  # same size, other bytes
    fs.pipe_file(f"{url}/shard-000000.tar", bytes(data))
    for backend in ("dali", "torch"):  # the torch backend's forked workers must not inherit the DALI pipeline
        with pytest.raises(DataError, match="shard-000000.tar: its bytes are not those the manifest records"):
            batches = iter(open_loader(url, LoaderConfig(backend=backend, threads=1), 16, 0, torch.device("cpu")))
            for _ in range(30):
                next(batches)
    result = CliRunner().invoke(main, ["verify", url])
    assert result.exit_code == 1 and "shard-000000.tar: sha256 differs from the manifest" in result.output
    fs.rm_file(f"{url}/shard-000001.tar")
    with pytest.raises(DataError, match="shard-000001.tar: listed in .*manifest.json but missing from the bucket"):
        open_loader(url, LoaderConfig(backend="torch", threads=1), 16, 0, torch.device("cpu"))
    result = CliRunner().invoke(main, ["verify", url])
    assert result.exit_code == 1 and "shard-000001.tar: shard-000001.tar missing from the bucket" in result.output


@pytest.mark.parametrize("url,message", [
    ("s3:/bars/x", "is not a URL of the form s3://BUCKET/PREFIX"),
    ("s3://Bad_Bucket/x", "'Bad_Bucket' is not a bucket name"),
    ("ftp://host/x", "ftp:// is not supported here"),
    ("s3://", "is not a URL of the form s3://BUCKET/PREFIX"),
])
def test_a_malformed_or_unsupported_url_exits_2_and_never_becomes_a_folder(url, message, small_tar, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["prepare", str(small_tar), url], ["verify", url], ["bench", "loader", url]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert list(tmp_path.iterdir()) == []


def test_commands_that_take_folders_only_refuse_urls(tmp_path, checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [(["report", "s3://bars/run"], "is a URL; this takes a local path only"),
             (["bench", "export", str(checkpoint), "--scratch", "s3://bars/x"], "is a URL"),
             (["run", "s3://bars/p.yaml"], "is a URL"),
             (["init", "s3://bars/photos"], "is a URL")]
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    pipeline = tmp_path / "p.yaml"
    for key, value in (("run_dir", "s3://bars/run"), ("data.source", "s3://bars/images")):
        pipeline.write_text("name: x\ndata:\n  source: a.tar\n")
        result = CliRunner().invoke(main, ["run", str(pipeline), "--set", f"{key}={value}", "--dry-run"])
        assert result.exit_code == 2 and f"{key}: {value} is a URL" in result.output
    with pytest.raises(ConfigError, match="loader.shards: s3:/bars is not a URL of the form"):
        open_loader("s3:/bars", LoaderConfig(backend="torch"), 16, 0, torch.device("cpu"))
    assert list(tmp_path.iterdir()) == [pipeline]


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def test_storage_errors_name_the_bucket_and_exit_1(s3_server, bucket, small_tar, small_shards):
    result = run_cli("prepare", str(small_tar), "s3://no-such-bucket-here/x", env={})
    assert result.returncode == 1 and "no bucket 'no-such-bucket-here'" in result.stderr
    assert "aws s3 mb" in result.stderr
    copy_to_bucket(small_shards, f"{bucket}/set")
    unreachable = run_cli("verify", f"{bucket}/set", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert unreachable.returncode == 1 and f"{bucket}/set/manifest.json" in unreachable.stderr
    assert "check that the server" in unreachable.stderr and "Traceback" not in unreachable.stderr
    for result in (result, unreachable):
        assert S3_SECRET not in result.stdout + result.stderr


def test_access_denied_is_named_with_what_to_check(s3_server, small_tar):
    server, endpoint = start_s3_server(INITIAL_NO_AUTH_ACTION_COUNT="0")  # every request must be signed by a user
    try:
        for args in (["verify", "s3://private-set/x"], ["prepare", str(small_tar), "s3://private-set/x"]):
            result = run_cli(*args, env={"AWS_ENDPOINT_URL": endpoint})
            assert result.returncode == 1, result.stderr
            assert "s3://private-set/x" in result.stderr and "access denied" in result.stderr
            assert "AWS_ACCESS_KEY_ID" in result.stderr and S3_SECRET not in result.stdout + result.stderr
    finally:
        server.terminate()


def test_a_server_that_never_answers_ends_a_command_within_its_timeouts_naming_the_endpoint(s3_server):
    import socket
    import time

    with socket.socket() as silent:  # accepts connections (the kernel does, up to the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        result = run_cli("verify", "s3://silent/set", env={"AWS_ENDPOINT_URL": endpoint, "CGAN_PIPE_S3_TIMEOUT": "1",
                                                          "CGAN_PIPE_S3_TRIES": "2"})
        took = time.monotonic() - started
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"s3://silent/set/manifest.json: failed while reading it" in result.stderr
    assert f"check that the server at {endpoint} is up and reachable" in result.stderr
    assert "each request had 2 tries of up to 1 s without a reply" in result.stderr
    assert took < 60  # with s3fs's and botocore's default tries and waits it was still waiting after 400 s


def test_a_server_gone_mid_epoch_ends_in_an_error_naming_the_shard(s3_server, small_tar):
    import fsspec as fss
    import s3fs

    server, endpoint = start_s3_server()
    try:
        os.environ["AWS_ENDPOINT_URL"] = endpoint  # for this test's clients (and its DataLoader worker)
        s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps one client per process, made with the old endpoint
        fss.filesystem("s3").mkdir("going")
        url = "s3://going/set"
        prepare(DataConfig(str(small_tar), shard_size=50), url, progress=False)
        cfg = LoaderConfig(backend="torch", threads=1, shuffle_buffer=1)
        batches = iter(open_loader(url, cfg, 10, 0, torch.device("cpu")))
        next(batches)
        server.kill()
        server.wait()
        with pytest.raises(DataError, match=r"s3://going/set/shard-00000\d.tar: failed while reading it .*check "
                                            r"that the server at http://127.0.0.1:\d+ is up"):
            for _ in range(20):
                next(batches)
    finally:
        server.kill()
        os.environ["AWS_ENDPOINT_URL"] = s3_server["AWS_ENDPOINT_URL"]
        s3fs.S3FileSystem.clear_instance_cache()


def test_no_output_of_a_run_holds_the_secret_key(bucket_shards, bucket, small_tar, tmp_path):
    pipeline = tmp_path / "p.yaml"
    run_dir = tmp_path / "run"
    pipeline.write_text(f"name: t\nrun_dir: {run_dir}\ndata:\n  source: unused\nloader:\n  threads: 1\n"
                        f"  shards: {bucket_shards}\nmodel:\n  z_dim: 16\n  g_width: 32\n  d_width: 32\n"
                        f"train:\n  steps: 2\n  batch_size: 16\n  log_every: 1\n  sample_every: 2\n"
                        f"  checkpoint_every: 2\n  device: cpu\n")
    outputs = [CliRunner().invoke(main, ["train", str(pipeline), "-v"])]
    checkpoint = next((run_dir / "checkpoints").glob("*.pt"))
    outputs.append(CliRunner().invoke(main, ["eval", str(checkpoint), "--shards", bucket_shards, "--n", "50",
                                             "--classifier-steps", "2", "--device", "cpu", "-v"]))
    outputs.append(CliRunner().invoke(main, ["generate", str(checkpoint), f"{bucket}/gen", "--n", "10",
                                             "--device", "cpu", "-v"]))
    # `run` writes summary.json and report.html (from a local copy of the source, in a run folder of its own)
    whole = tmp_path / "whole.yaml"
    whole.write_text(pipeline.read_text().replace(f"run_dir: {run_dir}", f"run_dir: {tmp_path / 'whole'}")
                     .replace(f"  shards: {bucket_shards}\n", "").replace("source: unused", f"source: {small_tar}"))
    outputs.append(CliRunner().invoke(main, ["run", str(whole), "--set", "eval.metrics=[]", "-v"]))
    assert [r.exit_code for r in outputs] == [0, 0, 0, 0], [r.output[-600:] for r in outputs]
    secret = S3_SECRET.encode()
    assert not any(secret in result.output.encode() for result in outputs)
    written = [p for p in [*run_dir.rglob("*"), *(tmp_path / "whole").rglob("*")] if p.is_file()]
    assert any(p.name == "summary.json" for p in written)
    assert any(p.name == "report.html" for p in written) and any(p.suffix == ".pt" for p in written)
    assert not [p for p in written if secret in p.read_bytes()]
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    objects = fs.find(bucket.removeprefix("s3://")) + fs.find(bucket_shards.removeprefix("s3://"))
    assert objects and not [name for name in objects if secret in fs.cat_file(name)]


@pytest.mark.parametrize("cache_bytes,fetches", [(1 << 30, 2), (1, 4)])  # fits: once; else once per epoch
def test_whole_shards_are_fetched_once_or_once_per_epoch(bucket_shards, monkeypatch, cache_bytes, fetches):
    from cgan_pipe.data import shard_stream

    fetched = []
    real = shard_stream.read_checked
    monkeypatch.setattr(shard_stream, "read_checked", lambda url, *args: fetched.append(url) or real(url, *args))
    manifest = read_remote_manifest(bucket_shards)
    stream = shard_stream.ShardStream(bucket_shards, manifest.shards, 64, 0, 100, cache_bytes, True, False)
    for _ in range(2):
        images, labels = [], []
        for batch_images, batch_labels, marks in stream:
            images += batch_images
            labels += batch_labels
        assert len(images) == 200 and sorted(bytes(label).decode() for label in labels) == sorted(
            str(manifest.class_names.index(name)) for name, count in manifest.class_histogram.items()
            for _ in range(count))
    assert len(fetched) == fetches and len(set(fetched)) == 2


def test_a_bucket_split_by_whole_shards_needs_one_per_rank(bucket_shards):
    from cgan_pipe.data.dali_loader import DaliLoader
    from cgan_pipe.data.torch_loader import TorchLoader

    manifest = read_remote_manifest(bucket_shards)
    for loader, why in ((DaliLoader, "the dali loader splits"), (TorchLoader, "the torch loader splits")):
        with pytest.raises(ConfigError, match=f"{bucket_shards}: 2 shards cannot be shared by 3 ranks \\({why}"):
            loader(bucket_shards, manifest, LoaderConfig(threads=1), 16, 0, torch.device("cpu"), rank=2,
                   world_size=3)
    mine = TorchLoader(bucket_shards, manifest, LoaderConfig(threads=1), 16, 0, torch.device("cpu"), rank=1,
                       world_size=2)
    assert mine.samples_per_epoch == manifest.shards[1].samples


def test_ranks_prepare_into_one_bucket_prefix_and_merge_into_the_set_one_machine_writes(bucket, small_tar):
    settings = DataConfig(str(small_tar), shard_size=30)
    single = f"{bucket}/single"
    prepare(settings, single, progress=False)
    url = f"{bucket}/ranks"
    manifest, _ = prepare(settings, url, rank=1, world_size=2, progress=False)
    assert manifest is None
    assert sorted(name for name in object_sizes(url) if name.endswith(".tar")) == \
        ["shard-000001.tar", "shard-000003.tar", "shard-000005.tar"]
    with pytest.raises(DataError, match="4 of 7 shards are not uploaded yet"):
        merge_shards(url)
    prepare(settings, url, rank=0, world_size=2, progress=False)  # leaves rank 1's shards be
    result = CliRunner().invoke(main, ["prepare", str(small_tar), url, "--merge"])
    assert result.exit_code == 0 and "merged 7 shards, 200 samples" in result.output, result.output
    assert contents(url) == contents(single)


def test_under_torchrun_ranks_prepare_into_a_bucket_and_rank_0_uploads_the_manifest(s3_server, bucket, small_tar):
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"{bucket}/torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={port}",
               "-m", "cgan_pipe", "prepare", str(small_tar), url, "--shard-size", "30", "--workers", "1", "-q"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("200 samples in 7 shards") == 1  # rank 0 reports, once
    single = f"{bucket}/single-for-torchrun"
    prepare(DataConfig(str(small_tar), shard_size=30), single, progress=False)
    assert contents(url) == contents(single)
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr


@pytest.mark.parametrize("cache_bytes", [1, 10**9])
def test_the_torch_loader_fetches_the_next_shard_while_one_is_read(bucket_shards, monkeypatch, cache_bytes):
    from cgan_pipe.data import torch_loader

    manifest = read_remote_manifest(bucket_shards)
    events = []
    read = torch_loader.read_checked

    def recorded(url, *args):
        events.append(("fetched", url.rsplit("/", 1)[1]))
        return read(url, *args)

    monkeypatch.setattr(torch_loader, "read_checked", recorded)
    fetch = torch_loader._FetchShards(bucket_shards, cache_bytes)
    for sample in fetch({"shard": shard} for shard in manifest.shards):
        time.sleep(0.5)  # reading the shard: the next fetch runs meanwhile
        events.append(("read", sample["url"].rsplit("/", 1)[1]))
    assert events == [("fetched", "shard-000000.tar"), ("fetched", "shard-000001.tar"),
                      ("read", "shard-000000.tar"), ("read", "shard-000001.tar")]


@pytest.mark.parametrize("seed", [0, 1])
def test_prepare_into_a_bucket_killed_anywhere_reruns_to_the_uninterrupted_bucket(bucket, cifar_tar, seed):
    settings = ["--shard-size", "50", "--format", "png", "--workers", str(1 + seed), "-q"]
    whole, url = f"{bucket}/whole", f"{bucket}/killed"
    subprocess.run([CLI, "prepare", str(cifar_tar), whole, *settings], check=True, capture_output=True, timeout=300)
    _kill_once_uploaded([CLI, "prepare", str(cifar_tar), url, *settings], url, 16, seed)
    rerun = subprocess.run([CLI, "prepare", str(cifar_tar), url, *settings], capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert contents(url) == contents(whole)
    assert not staging_dir(url).exists()
    assert not _unfinished_uploads(bucket)


def _kill_once_uploaded(command: list[str], url: str, parts: int, seed: int) -> int:
    """Run `command`, which writes `parts` parts into `url`, and SIGKILL it once a number of them drawn by
    `seed` have their done record in the bucket, plus a few random milliseconds; returns that number."""
    rng = random.Random(seed)
    target, extra = rng.randrange(parts), rng.uniform(0, 0.05)
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline and \
            sum(name.endswith(".done.json") for name in object_sizes(url)) < target:
        time.sleep(0.02)
    time.sleep(extra)
    process.kill()
    process.wait()
    return target


def _unfinished_uploads(bucket: str) -> list:
    """The multipart uploads under way (or abandoned) in `bucket`."""
    return fsspec.filesystem("s3").call_s3("list_multipart_uploads", Bucket=bucket.removeprefix("s3://")).get(
        "Uploads", [])


def _generate_into(checkpoint: Path, out: str, verbosity: str = "-q") -> list[str]:
    return [CLI, "generate", str(checkpoint), out, "--seeds", "0-239", "--output", "both", "--batch-size", "10",
            "--shard-size", "30", "--device", "cpu", verbosity]


def test_generate_uploads_each_part_as_it_finishes_holding_at_most_two_locally(checkpoint, bucket, tmp_path,
                                                                              monkeypatch):
    from cgan_pipe import export as export_module

    url = f"{bucket}/streamed"
    events, held = [], []
    ship, generate = BucketParts.ship, export_module.generate

    def shipped(self, local, number, record, plan):
        held.append(len(list((local / "shards").glob("*shard-*.tar*"))))  # finished or being written
        ship(self, local, number, record, plan)
        events.append(f"uploaded {number}")

    def generated(*args, **kwargs):
        events.append("generated")
        return generate(*args, **kwargs)

    monkeypatch.setattr(BucketParts, "ship", shipped)
    monkeypatch.setattr(export_module, "generate", generated)
    result = CliRunner().invoke(main, _generate_into(checkpoint, url)[1:])
    assert result.exit_code == 0, result.output
    assert max(held) <= 2 and len(held) == 8
    generated_at = [i for i, event in enumerate(events) if event == "generated"]  # 3 per part, then the sheet's
    assert events.index("uploaded 0") < generated_at[7 * 3]  # before the last part was begun
    monkeypatch.undo()
    local = tmp_path / "local"
    subprocess.run(_generate_into(checkpoint, str(local)), check=True, capture_output=True, timeout=300)
    assert contents(url) == folder_contents(local)  # the same export, byte for byte
    assert not staging_dir(url).exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_generate_into_a_bucket_killed_anywhere_reruns_to_the_uninterrupted_bucket(bucket, checkpoint, tmp_path,
                                                                                   seed):
    url = f"{bucket}/generate-killed-{seed}"
    local = tmp_path / "whole"
    subprocess.run(_generate_into(checkpoint, str(local)), check=True, capture_output=True, timeout=300)
    target = _kill_once_uploaded(_generate_into(checkpoint, url), url, 8, seed)
    rerun = subprocess.run(_generate_into(checkpoint, url, "-v"), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{target} of 8 kept from an earlier run" in rerun.stderr or \
        f"{target + 1} of 8 kept from an earlier run" in rerun.stderr, rerun.stderr[-2000:]
    assert contents(url) == folder_contents(local)
    assert not staging_dir(url).exists()
    assert not _unfinished_uploads(bucket)


def test_under_torchrun_ranks_generate_into_one_bucket_prefix(s3_server, bucket, checkpoint, tmp_path):
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"{bucket}/generate-torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={port}",
               "-m", "cgan_pipe", *_generate_into(checkpoint, url)[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("240 images") == 1  # rank 0 reports, once
    local = tmp_path / "single"
    subprocess.run(_generate_into(checkpoint, str(local)), check=True, capture_output=True, timeout=300, env=env)
    assert contents(url) == folder_contents(local)
    assert not list(staging_dir(url).rglob("*"))
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr[-3000:]

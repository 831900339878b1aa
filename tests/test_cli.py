"""The command line: help, error messages and exit codes, and `cgan-pipe run` end to end."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cgan_pipe.cli import main
from cgan_pipe.config import LoaderConfig
from cgan_pipe.data.loader import open_loader
from cgan_pipe.data.manifest import read_manifest
from cgan_pipe.train.checkpoint import load_checkpoint

from conftest import CIFAR, CLASSES, ROOT, needs_full_cifar

CLI = str(Path(sys.executable).with_name("cgan-pipe"))


@pytest.mark.parametrize("command", ["init", "run", "report", "prepare", "train", "generate", "eval", "verify",
                                     "inspect", "bench prepare", "bench loader", "bench train", "bench export"])
def test_every_command_has_useful_help(command):
    result = CliRunner().invoke(main, [*command.split(), "--help"])
    assert result.exit_code == 0
    assert "Example: cgan-pipe " + command in result.output
    assert "-q, --quiet" in result.output and "-v, --verbose" in result.output


def test_bad_config_key_exits_2_naming_the_key(tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: x\ndata:\n  source: a.tar\ntrain:\n  setps: 3\n")
    result = CliRunner().invoke(main, ["run", str(pipeline)])
    assert result.exit_code == 2
    assert "p.yaml:5: train.setps: unknown key (did you mean 'steps'?)" in result.output
    assert "Traceback" not in result.output


def test_bad_set_value_and_missing_pipeline_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["run", str(ROOT / "pipelines" / "cifar.yaml"), "--set", "train.steps=-1"])
    assert result.exit_code == 2 and "--set train.steps: must be > 0" in result.output
    result = CliRunner().invoke(main, ["train", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "missing.yaml: pipeline file not found" in result.output


def test_missing_data_source_exits_1_with_advice(tmp_path):
    result = CliRunner().invoke(main, ["prepare", str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "does not exist" in result.output and "download:cifar10" in result.output


@needs_full_cifar
def test_run_under_torchrun_prepares_once_trains_on_both_ranks_and_reports_once(tmp_path):
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={port}",
               "-m", "cgan_pipe", "run", str(ROOT / "pipelines" / "cifar.yaml"),
               "--set", f"run_dir={run_dir}", "--set", "data.limit=400", "--set", "data.shard_size=100",
               "--set", "model.g_width=32", "--set", "model.d_width=32", "--set", "train.batch_size=32",
               "--set", "train.steps=2", "--set", "train.device=cpu", "--set", "loader.threads=1",
               "--set", "eval.metrics=[]", "--set", "export.n=20"]
    env = {**os.environ, "CGAN_PIPE_CIFAR10": str(CIFAR / "train.tar")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("prepare: 400 samples") == 1 and result.stdout.count("done: ") == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["export_images"] == 20
    assert len(list((run_dir / "export" / "files").glob("*/*.jpg"))) == 20


def test_train_without_shards_says_how_to_make_them(tmp_path):
    result = CliRunner().invoke(main, ["train", str(ROOT / "pipelines" / "cifar.yaml"), "-q",
                                       "--set", f"run_dir={tmp_path}"])
    assert result.exit_code == 1 and "cgan-pipe prepare" in result.output


def test_dry_run_prints_the_resolved_config(monkeypatch):
    monkeypatch.setenv("CGAN_PIPE_CIFAR10", "/data/elsewhere.tar")
    result = CliRunner().invoke(main, ["run", str(ROOT / "pipelines" / "cifar.yaml"), "--dry-run",
                                       "--set", "train.steps=300"])
    assert result.exit_code == 0
    assert "source: /data/elsewhere.tar" in result.output and "steps: 300" in result.output


def test_generate_from_the_cli(checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["generate", str(checkpoint), str(tmp_path / "g"), "--n", "4",
                                       "--format", "png", "--classes", "cat", "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "g" / "files" / "cat").iterdir()) == [
        f"seed000000{i}-c3-q0.png" for i in range(4)]
    assert json.loads(result.output.splitlines()[-1])["export_files"] == str(tmp_path / "g" / "files")
    bad = CliRunner().invoke(main, ["generate", str(checkpoint), str(tmp_path / "h"), "--n", "4", "--format", "gif"])
    assert bad.exit_code == 2 and "'--format': 'gif' is not one of" in bad.output


def test_generate_takes_a_seed_range_and_per_class_counts(checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["generate", str(checkpoint), str(tmp_path / "g"), "--seeds", "10-14",
                                       "--classes", "dog=2,ship=3", "--output", "files", "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(tmp_path / "g" / "files").as_posix() for p in (tmp_path / "g").rglob("*.jpg")) == [
        "dog/seed0000010-c5-q95.jpg", "dog/seed0000011-c5-q95.jpg", "ship/seed0000012-c8-q95.jpg",
        "ship/seed0000013-c8-q95.jpg", "ship/seed0000014-c8-q95.jpg"]
    for args, message in ([["--seeds", "9-3"], "'--seeds': '9-3': expected A-B"],
                          [["--seeds", "0-9", "--n", "5"], "--n 5 and --seeds 0-9 (10 seeds) disagree"],
                          [["--classes", "dog=2,ship"], "'ship' is not NAME=COUNT"],
                          [["--classes", "dog=2", "--n", "3"], "--n: 3 images, but the counts in --classes add up"]):
        bad = CliRunner().invoke(main, ["generate", str(checkpoint), str(tmp_path / "h"), *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    assert not (tmp_path / "h").exists()


def test_generate_asks_a_quality_conditioned_model_for_a_quality(checkpoint, quality_checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["generate", str(quality_checkpoint), str(tmp_path / "g"), "--n", "2",
                                       "--quality-cond", "50", "--classes", "dog", "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "g" / "files" / "dog").iterdir()) == [
        f"seed000000{i}-c5-q95-qc50.jpg" for i in range(2)]
    refused = CliRunner().invoke(main, ["generate", str(checkpoint), str(tmp_path / "h"), "--n", "2",
                                        "--quality-cond", "50"])
    assert refused.exit_code == 2 and f"{checkpoint}: this model was trained without quality" in refused.output


@needs_full_cifar
def test_run_end_to_end_on_a_cifar_subset(tmp_path):
    run_dir = tmp_path / "run"
    args = [CLI, "run", str(ROOT / "pipelines" / "cifar.yaml"),
            "--set", f"run_dir={run_dir}", "--set", "data.limit=2000", "--set", "data.shard_size=800",
            "--set", "train.steps=20", "--set", "train.log_every=10", "--set", "train.sample_every=10",
            "--set", "train.checkpoint_every=10", "--set", "export.n=120", "--set", "export.quality=90",
            "--set", "eval.classifier_steps=20", "--set", "eval.n_samples=200", "--set", "eval.n_reference=500",
            "--set", f"eval.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "CGAN_PIPE_CIFAR10": str(CIFAR / "train.tar")}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())

    # shards: 2000 samples in 3 shards, each with a DALI index, listed in the manifest
    manifest = read_manifest(Path(summary["shards"]))
    assert manifest.num_samples == 2000 and [s.samples for s in manifest.shards] == [800, 800, 400]
    assert sum(manifest.class_histogram.values()) == 2000 and manifest.class_names == CLASSES
    assert all((run_dir / "shards" / s.index).read_text().startswith(f"v1.2 {s.samples}\n") for s in manifest.shards)

    # checkpoint, metrics, samples
    state = load_checkpoint(Path(summary["checkpoint"]))
    assert state["step"] == 20 == summary["steps"]
    assert {"G", "D", "G_ema", "opt_g", "opt_d", "config"} <= state.keys()
    rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20] and summary["images_per_s"] > 0
    grid = Image.open(summary["sample_grid"])
    assert grid.size == (10 * 33 + 1, 10 * 33 + 1)  # one row of 10 per class, 32px + 1px padding

    # eval: the classifier metrics of the final checkpoint, recorded beside it
    assert summary["eval"]["n_samples"] == 200 and 0 <= summary["eval"]["class_accuracy"] <= 1
    assert summary["eval"]["classifier_fd"] > 0 and 1 <= summary["eval"]["classifier_score"] <= 10
    assert json.loads((run_dir / "eval.json").read_text())["scores"] == summary["eval"]

    # export: 120 JPEGs at q90 in class folders, and the same images as loadable shards
    files = sorted(Path(summary["export_files"]).glob("*/*.jpg"))
    assert len(files) == 120 and {f.parent.name for f in files} == set(CLASSES)
    assert all(Image.open(f).size == (32, 32) for f in files)
    exported = read_manifest(Path(summary["export_shards"]))
    assert exported.num_samples == 120 and exported.quality_histogram == {"90": 120}
    batch = next(iter(open_loader(Path(summary["export_shards"]), LoaderConfig(threads=1), 120, 0,
                                  torch.device("cpu"))))
    assert batch.images.shape == (120, 3, 32, 32)

    # the report: one page, every image embedded
    report = Path(summary["report"]).read_text()
    assert report.count('src="data:image/png;base64,') >= 3 and "<h2>Samples over training</h2>" in report

    # a rerun finds every stage up to date
    again = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr
    stages = json.loads((run_dir / "summary.json").read_text())["stages"]
    assert {name: s["status"] for name, s in stages.items()} == {
        "prepare": "up to date", "train": "up to date", "eval": "up to date", "export": "up to date"}


def test_verify_and_inspect_commands(small_shards, tmp_path):
    ok = CliRunner().invoke(main, ["verify", str(small_shards), "-q"])
    assert ok.exit_code == 0 and "200 samples in 2 shards: ok" in ok.output
    shown = CliRunner().invoke(main, ["inspect", str(small_shards), "--json", "--sheet", str(tmp_path / "s.png")])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.output)
    assert summary["samples"] == 200 and summary["class_histogram"]["cat"] == 20
    assert Image.open(summary["contact_sheet"]).size == (8 * 34 + 2, 10 * 34 + 2)
    missing = CliRunner().invoke(main, ["verify", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "no manifest" in missing.output


def test_verify_fails_with_exit_1_naming_the_bad_sample(small_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_shards, copy)
    with tarfile.open(copy / "shard-000000.tar") as tar:
        member = tar.getmember("00000007.jpg")
    with open(copy / "shard-000000.tar", "r+b") as handle:  # zero the JPEG's data in place
        handle.seek(member.offset_data)
        handle.write(bytes(member.size))
    result = CliRunner().invoke(main, ["verify", str(copy), "-q"])
    assert result.exit_code == 1
    assert "shard-000000.tar:00000007: DALI c" in result.output  # "cannot decode it" or "crashed decoding it"
    assert "FAILED" in result.output


def test_prepare_with_several_qualities_from_the_cli(small_tar, tmp_path):
    result = CliRunner().invoke(main, ["prepare", str(small_tar), str(tmp_path / "q"), "--quality", "20,80",
                                       "--limit", "10", "-q"])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "q").quality_histogram == {"20": 10, "80": 10}
    again = CliRunner().invoke(main, ["prepare", str(small_tar), str(tmp_path / "q"), "--quality", "20,80",
                                      "--limit", "10", "-q"])
    assert again.exit_code == 0 and "already complete" in again.output
    bad = CliRunner().invoke(main, ["prepare", str(small_tar), str(tmp_path / "r"), "--quality", "0,50"])
    assert bad.exit_code == 2 and "'--quality': '0,50': expected comma-separated numbers between 1 and 100" in \
        bad.output


def test_prepare_on_two_ranks_from_torchrun_variables_then_merge(small_tar, tmp_path):
    out = str(tmp_path / "s")
    for rank in ("0", "1"):
        result = CliRunner().invoke(main, ["prepare", str(small_tar), out, "--shard-size", "50", "-q"],
                                    env={"RANK": rank, "WORLD_SIZE": "2"})
        assert result.exit_code == 0, result.output
        assert f"rank {rank} of 2" in result.output
    assert not (tmp_path / "s" / "manifest.json").exists()
    merged = CliRunner().invoke(main, ["prepare", str(small_tar), out, "--merge"])
    assert merged.exit_code == 0 and "merged 4 shards, 200 samples" in merged.output
    assert read_manifest(tmp_path / "s").num_samples == 200

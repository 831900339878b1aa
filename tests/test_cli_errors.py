"""Every user-facing error path of the CLI: exit code 2 for a usage or config mistake, 1 for a runtime
failure, a one-line message naming the file, key or option, and never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cgan_pipe.cli import main

ROOT = Path(__file__).resolve().parents[1]
CIFAR_YAML = str(ROOT / "pipelines" / "cifar.yaml")

# (name, arguments with {tmp}, {ckpt}, {shards}, {tar} filled in, exit code, what the message must say)
CASES = [
    ("missing pipeline", ["run", "{tmp}/none.yaml"], 2, "none.yaml: pipeline file not found"),
    ("unknown key", ["run", "{tmp}/typo.yaml"], 2, "typo.yaml:4: train.setps: unknown key (did you mean 'steps'?)"),
    ("bad YAML", ["run", "{tmp}/broken.yaml"], 2, "broken.yaml"),
    ("value out of range", ["run", CIFAR_YAML, "--set", "train.steps=-1"], 2, "--set train.steps: must be > 0"),
    ("wrong type", ["run", CIFAR_YAML, "--set", "train.batch_size=big"], 2, "--set train.batch_size: expected int"),
    ("unknown --set key", ["run", CIFAR_YAML, "--set", "train.stpes=3"], 2, "did you mean 'steps'?"),
    ("--set without =", ["run", CIFAR_YAML, "--set", "train.steps"], 2, "expected KEY=VALUE"),
    ("choice", ["run", CIFAR_YAML, "--set", "loader.backend=jax"], 2, "loader.backend: must be one of dali, torch"),
    ("keys that disagree", ["run", CIFAR_YAML, "--set", "export.quality_cond=10"], 2, "export.quality_cond"),
    ("fp16 on a CPU", ["train", CIFAR_YAML, "--set", "train.precision=fp16", "--set", "train.device=cpu",
                       "--set", "run_dir={tmp}/run", "--set", "loader.shards={shards}"], 2, "train.precision: fp16"),
    ("missing source", ["prepare", "{tmp}/nothing", "{tmp}/out"], 1, "nothing' does not exist"),
    ("init name leaving runs/", ["init", "{tar}", "--name", "../escaped", "--out", "{tmp}/escaped.yaml"], 2,
     "init --name: name: must be a plain folder name"),
    ("bad prepare format", ["prepare", "{tar}", "{tmp}/out", "--format", "gif"], 2, "--format"),
    ("bad prepare quality", ["prepare", "{tar}", "{tmp}/out", "--quality", "0"], 2, "--quality"),
    ("corrupt tar", ["prepare", "{tmp}/garbage.tar", "{tmp}/out"], 1, "garbage.tar"),
    ("no shards to train on", ["train", CIFAR_YAML, "--set", "run_dir={tmp}/empty"], 1, "cgan-pipe prepare"),
    ("networks larger than the memory", ["train", CIFAR_YAML, "--set", "model.g_width=100000000", "--set",
                                         "train.device=cpu", "--set", "run_dir={tmp}/big", "--set",
                                         "loader.shards={shards}"], 2, "model.g_width 100000000, model.d_width"),
    ("verify a folder without a manifest", ["verify", "{tmp}"], 1, "no manifest"),
    ("inspect a folder without a manifest", ["inspect", "{tmp}"], 1, "no manifest"),
    ("verify a damaged shard", ["verify", "{tmp}/damaged"], 1, "shard-000000.tar"),
    ("missing checkpoint", ["generate", "{tmp}/none.pt", "{tmp}/g", "--n", "2"], 1, "none.pt: checkpoint not found"),
    ("not a checkpoint", ["generate", "{tmp}/typo.yaml", "{tmp}/g", "--n", "2"], 1, "typo.yaml: not a checkpoint"),
    ("unknown export format", ["generate", "{ckpt}", "{tmp}/g", "--n", "2", "--format", "gif"], 2,
     "'--format': 'gif' is not one of"),
    ("export quality", ["generate", "{ckpt}", "{tmp}/g", "--n", "2", "--quality", "101"], 2,
     "--quality: must be between 1 and 100 (got 101)"),
    ("unknown class", ["generate", "{ckpt}", "{tmp}/g", "--n", "2", "--classes", "unicorn"], 2, "unknown 'unicorn'"),
    ("bad seed range", ["generate", "{ckpt}", "{tmp}/g", "--seeds", "5-1"], 2, "'--seeds': '5-1': expected A-B"),
    ("more seeds than memory", ["generate", "{ckpt}", "{tmp}/g", "--seeds", "0-99999999999999"], 2,
     "export.n: 100,000,000,000,000 images"),
    ("quality asked of a plain model", ["generate", "{ckpt}", "{tmp}/g", "--n", "2", "--quality-cond", "10"], 2,
     "trained without quality conditioning"),
    ("output folder in use", ["generate", "{ckpt}", "{tmp}/busy", "--n", "2"], 2,
     "holds files cgan-pipe did not write (mine.txt)"),
    ("truncation", ["generate", "{ckpt}", "{tmp}/g", "--n", "2", "--truncation", "0.001"], 2,
     "--truncation: must be at least 0.05"),
    ("unknown metric", ["eval", "{ckpt}", "--metrics", "beauty"], 2, "beauty"),
    ("eval of a missing checkpoint", ["eval", "{tmp}/none.pt"], 1, "none.pt: checkpoint not found"),
    ("generate from an incomplete checkpoint", ["generate", "{tmp}/incomplete.pt", "{tmp}/g", "--n", "2"], 1,
     "incomplete.pt: incomplete checkpoint (dataset is missing)"),
    ("eval of an incomplete checkpoint", ["eval", "{tmp}/incomplete.pt"], 1,
     "incomplete.pt: incomplete checkpoint (dataset is missing)"),
    ("eval without shards", ["eval", "{ckpt}"], 2, "no shard set beside it; give the real shards with --shards"),
    ("bench distortion range", ["bench", "loader", "{shards}", "--jpeg-distort", "40,10"], 2, "--jpeg-distort"),
    ("bench precision", ["bench", "train", "{shards}", "--precision", "fp8", "--device", "cpu"], 2,
     "'--precision': 'fp8': expected some of fp32, bf16, fp16"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, small_shards, small_tar, checkpoint):
    tmp = tmp_path_factory.mktemp("errors")
    (tmp / "typo.yaml").write_text("name: x\ndata: {source: a.tar}\ntrain:\n  setps: 3\n")
    (tmp / "broken.yaml").write_text("name: x\ndata: [unclosed\n")
    (tmp / "garbage.tar").write_bytes(b"\x00" * 100 + b"not a tar" * 300)
    (tmp / "busy").mkdir()
    (tmp / "busy" / "mine.txt").write_text("keep me")
    state = torch.load(checkpoint, weights_only=True)
    del state["dataset"]  # the right kind and version, a part missing
    torch.save(state, tmp / "incomplete.pt")
    shutil.copytree(small_shards, tmp / "damaged")
    with open(tmp / "damaged" / "shard-000000.tar", "r+b") as handle:
        handle.seek(5000)
        handle.write(b"\xff" * 64)
    return {"tmp": str(tmp), "ckpt": str(checkpoint), "shards": str(small_shards), "tar": str(small_tar)}


@pytest.mark.parametrize("name, args, code, message", CASES, ids=[case[0] for case in CASES])
def test_each_error_exits_with_its_code_and_names_what_is_wrong(files, name, args, code, message):
    filled = [arg.format(**files) for arg in args]
    result = CliRunner().invoke(main, filled)
    assert result.exit_code == code, result.output
    assert message.format(**files) in result.output, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (TypeError, KeyError, ValueError))

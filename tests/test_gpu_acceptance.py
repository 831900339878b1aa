"""benchmarks/gpu_acceptance.py: its plan, and a whole small run on the CPU, give one JSON of the same shape."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import ROOT, cifar_members, write_tar

SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"
STEPS = ["prepare", "loader-torch", "train-torch", "checkpoint", "export", "tests", "prepare-64", "train-torch-64",
         "prepare-128", "train-torch-128", "loader-dali", "train-dali"]
KEYS = {"device", "date", "dry_run", "small", "versions", "steps", "loader", "train", "export", "tests"}


def _run(tmp_path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    out, data = tmp_path / "acceptance.json", write_tar(tmp_path / "cifar-test.tar", cifar_members("test", 30))
    done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), "--out", str(out),
                           "--work", str(tmp_path / "work"), *options], capture_output=True, text=True, timeout=600)
    return done, json.loads(out.read_text())


def test_the_dry_run_lists_every_step_in_order_and_runs_none(tmp_path):
    done, result = _run(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(result) == KEYS and result["dry_run"] is True
    assert result["device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    assert [s["name"] for s in result["steps"]] == STEPS
    assert all(s["rc"] is None and s["skipped"] for s in result["steps"])
    assert result["loader"] == result["train"] == result["export"] == [] and result["tests"] is None
    assert not (tmp_path / "work" / "shards").exists()


def test_a_small_run_on_the_cpu_fills_every_section(tmp_path):
    done, result = _run(tmp_path, "--small")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert set(result) == KEYS and result["small"] is True and result["dry_run"] is False
    assert [(s["name"], s["rc"]) for s in result["steps"]] == [(name, 0) for name in STEPS]
    loaders = {(r["backend"], r["device"]) for r in result["loader"]}
    assert {("torch", "cpu"), ("torch+jpeg_distort", "cpu"), ("baseline", "cpu"), ("dali", "cpu")} <= loaders
    assert {(r["backend"], r["arch"], r["resolution"]) for r in result["train"]} == {
        *(("torch", arch, size) for arch in ("dcgan", "resnet", "r3gan") for size in (32, 64, 128)),
        ("dali", "dcgan", 32)}
    assert all(r["kimg_per_s"] > 0 and 0 <= r["data_wait"] < 1 for r in result["train"])
    assert {r["method"] for r in result["export"]} >= {"export", "export-444"}
    assert result["tests"]["tests"] > 0 and result["tests"]["failures"] == result["tests"]["errors"] == 0

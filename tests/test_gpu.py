"""The GPU path end to end on a CUDA device (skipped without one): train, kill -9 and resume with either loader
backend, bf16 and fp16, compiled or not, with R1; R3GAN's family, loss, R1 + R2 and schedules; host syncs per
training step; export in both JPEG chroma subsamplings. The kill-and-resume cycles also run here on the CPU, so
the tests themselves are exercised everywhere."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, JpegImagePlugin

from cgan_pipe.train.checkpoint import list_checkpoints, load_checkpoint

from conftest import small_config

CLI = [sys.executable, "-m", "cgan_pipe"]  # the interpreter running the tests, wherever its scripts are
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


R3GAN = ({"arch": "r3gan"}, {"loss": "rpgan", "r2_gamma": 1.0, "schedule_kimg": 0.5,
                             "schedule_to": {"lr_g": 5e-5, "lr_d": 5e-5, "r1_gamma": 0.1, "r2_gamma": 0.1, "beta2": 0.99}})


def _kill_after_first_checkpoint_and_resume(shards: Path, tmp_path: Path, device: str, backend: str,
                                            precision: str, compiled: bool, model: dict | None = None,
                                            train: dict | None = None) -> dict:
    """`cgan-pipe train` (with R1 every other step, and what `model` and `train` add) killed with SIGKILL once
    its first checkpoint is written, then run again to its last step: the newest checkpoint, as the rerun found
    it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "shards").symlink_to(shards)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "gpu", "run_dir": str(run_dir), "data": {"source": "unused"},
        "loader": {"backend": backend, "device": device, "threads": 2},
        "model": {"z_dim": 32, "g_width": 32, "d_width": 32, **(model or {})}, "eval": {"metrics": []},
        "train": {"steps": 60, "batch_size": 16, "log_every": 2, "sample_every": 60, "checkpoint_every": 4,
                  "device": device, "precision": precision, "compile": compiled, "r1_gamma": 1.0, "r1_every": 2,
                  **(train or {})},
    }))
    command = [*CLI, "train", str(pipeline), "-q"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not list_checkpoints(run_dir / "checkpoints") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()
    _, errors = process.communicate()
    saved = [load_checkpoint(path)["step"] for path in list_checkpoints(run_dir / "checkpoints")]
    assert saved, f"no checkpoint before the kill: {errors.decode()[-2000:]}"
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if saved[-1] < 60:
        assert f"step 60 (resumed from step {saved[-1]})" in rerun.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 61, 2))
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) and r["skipped"] == 0 for r in rows)
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])


@pytest.mark.parametrize("family", ["dcgan", "r3gan"])
def test_train_killed_and_resumed_on_the_cpu(small_shards, tmp_path, family):
    model, train = R3GAN if family == "r3gan" else ({}, {})
    state = _kill_after_first_checkpoint_and_resume(small_shards, tmp_path, "cpu", "torch", "bf16", False, model,
                                                    train)
    assert state["step"] == 60 and set(state["rng"]) == {"torch"}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend, precision, compiled, family", [  # each backend in each precision, compiled on
    ("dali", "bf16", True, "dcgan"), ("dali", "fp16", False, "dcgan"),  # each backend, and R3GAN's whole set-up
    ("torch", "bf16", False, "dcgan"), ("torch", "fp16", False, "dcgan"), ("torch", "bf16", True, "dcgan"),
    ("torch", "bf16", False, "r3gan"), ("torch", "fp16", False, "r3gan")])
def test_train_killed_and_resumed_on_a_gpu(small_shards, tmp_path, backend, precision, compiled, family):
    model, train = R3GAN if family == "r3gan" else ({}, {})
    state = _kill_after_first_checkpoint_and_resume(small_shards, tmp_path, "cuda", backend, precision, compiled,
                                                    model, train)
    assert state["step"] == 60 and set(state["rng"]) == {"torch", "cuda"}
    assert all(torch.isfinite(t).all() for t in state["D"].values() if t.is_floating_point())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_default_training_step_on_a_gpu_makes_at_most_one_host_sync(small_shards, tmp_path, backend):
    from cgan_pipe.bench import count_cuda_syncs
    from cgan_pipe.train.loop import train

    counts = {}
    for steps in (8, 24):
        run_dir = tmp_path / f"run{steps}"
        cfg = small_config(run_dir, {"loader": {"device": "cuda", "backend": backend}}, steps=steps, device="cuda",
                           log_every=1000, sample_every=1000, checkpoint_every=1000)
        counts[steps] = count_cuda_syncs(lambda: train(cfg, small_shards, run_dir, progress=False))
    assert (counts[24] - counts[8]) / 16 <= 1, counts


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("subsampling, sampling", [("4:2:0", 2), ("4:4:4", 0)])
def test_gpu_export_writes_the_chroma_subsampling_its_record_names(checkpoint, tmp_path, subsampling, sampling):
    from cgan_pipe.config import ExportConfig
    from cgan_pipe.export import export

    out = export(checkpoint, tmp_path / "out", ExportConfig(n=20, jpeg_subsampling=subsampling),
                 device=torch.device("cuda"), progress=False)
    assert json.loads((out.out_dir / "export.json").read_text())["subsampling"] == subsampling
    files = sorted(out.files.rglob("*.jpg"))
    assert len(files) == 20 and all(JpegImagePlugin.get_sampling(Image.open(f)) == sampling for f in files)

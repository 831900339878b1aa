"""SIGTERM and SIGINT: training writes a checkpoint of the step under way and says so; every command ends
with a message and 128 + the signal's number, leaving nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cgan_pipe.atomic import TEMP_MARK
from cgan_pipe.train.checkpoint import list_checkpoints, load_checkpoint

CLI = str(Path(sys.executable).with_name("cgan-pipe"))


def _wait_for(condition, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


@pytest.mark.parametrize("stop, backend, whole_group", [(signal.SIGTERM, "dali", False),
                                                        (signal.SIGINT, "torch", True)])
def test_a_signal_ends_training_with_a_checkpoint_of_the_step_under_way(small_shards, tmp_path, stop, backend,
                                                                         whole_group):
    run_dir = tmp_path / "run"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "stop", "run_dir": str(run_dir), "data": {"source": "unused"},
        "loader": {"threads": 2, "shards": str(small_shards), "backend": backend}, "eval": {"metrics": []},
        "model": {"z_dim": 16, "g_width": 32, "d_width": 32},
        "train": {"steps": 100_000, "batch_size": 16, "log_every": 1, "checkpoint_every": 1000, "device": "cpu"},
    }))
    # in a session of its own, so that a signal to its whole process group (a terminal's Ctrl-C, a scheduler
    # stopping a job) reaches its DataLoader workers too, and not this test
    process = subprocess.Popen([CLI, "train", str(pipeline), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    _wait_for(lambda: len(_logged_steps(run_dir)) >= 3)
    if whole_group:
        os.killpg(process.pid, stop)
    else:
        process.send_signal(stop)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + stop, err
    (saved,) = list_checkpoints(run_dir / "checkpoints")
    step = load_checkpoint(saved)["step"]
    assert f"interrupted by {signal.Signals(stop).name}: training stopped at step {step} and wrote {saved}; " \
           f"rerun the same command to resume" in err and "Traceback" not in err
    assert step >= 3 and _logged_steps(run_dir)[-1] == step  # no step lost: the last one logged is saved
    assert not [p for p in run_dir.rglob("*") if TEMP_MARK in p.name]
    pipeline.write_text(pipeline.read_text().replace("100000", str(step + 2)))
    again = subprocess.run([CLI, "train", str(pipeline)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"step {step + 2} (resumed from step {step})" in again.stdout, again.stderr


def test_sigterm_ends_prepare_with_a_message_and_a_rerun_completes_it(cifar_tar, tmp_path):
    out = tmp_path / "out"
    command = [CLI, "prepare", str(cifar_tar), str(out), "--shard-size", "20", "--format", "png", "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(list(out.glob("shard-*.tar"))) >= 2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and "interrupted by SIGTERM; rerun the same command to resume" in err, err
    assert "Traceback" not in err and not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if TEMP_MARK in p.name]  # the shard being written was removed
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 800

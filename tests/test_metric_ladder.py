"""The built-in classifier metric on the degradation ladder: worse real images must score worse, rung by rung."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cgan_pipe.config import DataConfig

from cgan_pipe.data.shards import prepare
from conftest import CIFAR, ROOT, needs_full_cifar


@pytest.mark.slow  # trains the classifier on 50,000 images (about 5 minutes on 2 cores), then scores 27 rungs
@needs_full_cifar
def test_classifier_fd_rises_at_every_rung_of_every_ladder(tmp_path):
    shards = tmp_path / "shards"
    prepare(DataConfig(str(CIFAR / "train.tar")), shards, progress=False)  # the cifar preset's data settings
    report = tmp_path / "ladder.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "metric_ladder.py"), str(shards),
                           str(CIFAR / "test.tar"), "--n", "5000", "--json", str(report)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    scores = json.loads(report.read_text())
    assert scores["not_monotonic"] == []
    assert set(scores["ladders"]) == {"blur", "noise", "jpeg", "classes", "distinct", "colour"}
    assert scores["clean"]["class_accuracy"] > 0.8  # the classifier itself is a strong one

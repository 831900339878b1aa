"""benchmarks/quality_curves.py: step-bounded runs per setting and seed, every checkpoint scored once, a plot."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "quality_curves.py"


def _pipeline(tmp_path, source):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "data": {"source": str(source), "shard_size": 120}, "loader": {"threads": 1},
        "model": {"z_dim": 16, "g_width": 32, "d_width": 32},
        "train": {"batch_size": 16, "log_every": 1, "device": "cpu"},
    }))
    return path


def _curves(tmp_path, source, held_out):
    command = [sys.executable, str(SCRIPT), str(_pipeline(tmp_path, source)), "--held-out", str(held_out),
               "--seeds", "1", "--jobs", "2", "--minutes", "0.4", "--every", "0.2", "--steps-per-minute", "10",
               "--setting", "lr: train.lr_g=0.001; train.lr_d=0.001", "--n-samples", "40", "--n-reference", "100",
               "--classifier-steps", "5", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "curves.json"),
               "--plot", str(tmp_path / "curves.png")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return json.loads((tmp_path / "curves.json").read_text()), done.stdout


def test_every_checkpoint_of_every_run_is_scored_once_and_plotted(tmp_path, small_tar, small_shards):
    results, _ = _curves(tmp_path, small_tar, small_shards)  # the pipeline's data is prepared into WORK/shards
    assert set(results["settings"]) == {"preset", "lr"}
    for name, entry in results["settings"].items():
        assert set(entry["seeds"]) == {"1"}
        for rows in entry["seeds"].values():
            assert [row["step"] for row in rows] == [2, 4]  # 0.2 and 0.4 minutes at 10 steps a minute
            assert [row["minutes"] for row in rows] == [0.2, 0.4]
            for row in rows:
                assert 0 <= row["class_accuracy"] <= 1 and row["classifier_fd"] > 0
                assert row["class_diversity"] > 0 and row["real_class_diversity"] > 0
                assert -1 <= row["r_t"] <= 1 and {"d_train", "d_held_out", "d_fake"} <= set(row)
    assert results["settings"]["lr"]["sets"] == ["train.lr_g=0.001", "train.lr_d=0.001"]
    config = yaml.safe_load((tmp_path / "work" / "lr" / "seed1" / "config.yaml").read_text())
    assert config["train"]["lr_g"] == 0.001 and config["seed"] == 1
    assert (tmp_path / "curves.png").stat().st_size > 10_000

    # run again: every run is finished and every checkpoint scored, so nothing is trained or scored twice
    assert (tmp_path / "work" / "shards" / "manifest.json").is_file()
    again, printed = _curves(tmp_path, small_tar, small_shards)
    assert again["settings"] == results["settings"]
    assert "fd" not in printed

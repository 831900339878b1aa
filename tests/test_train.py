"""Training on CPU: steps run, outputs appear, checkpoints are safe, a rerun resumes."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from cgan_pipe.errors import ConfigError, DataError
from cgan_pipe.train.checkpoint import list_checkpoints, load_checkpoint
from cgan_pipe.train.loop import train

from conftest import small_config


def test_train_writes_metrics_samples_and_checkpoints(small_shards, tmp_path):
    result = train(small_config(tmp_path), small_shards, tmp_path, progress=False)
    assert result.steps == 4 and result.resumed_from == 0 and result.images_per_s > 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all({"loss_d", "loss_g", "images_per_s", "data_wait", "kimg", "epoch"} <= r.keys() for r in rows)
    assert rows[-1]["epoch"] == round(4 * 16 / 200, 3)  # 4 steps of 16 over the 200 samples
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-0000002.pt", "ckpt-0000004.pt"]
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 4 and state["config"]["train"]["steps"] == 4
    assert {"G", "D", "G_ema", "opt_g", "opt_d", "rng", "dataset"} <= state.keys()
    assert state["dataset"]["class_names"][3] == "cat"


def test_training_with_diffaugment_runs_and_a_bad_policy_names_the_key(small_shards, tmp_path):
    result = train(small_config(tmp_path, steps=2, diffaugment="color,translation,cutout"), small_shards, tmp_path,
                   progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in rows)
    with pytest.raises(ConfigError, match="train.diffaugment: unknown DiffAugment transform 'rotate'"):
        small_config(tmp_path, diffaugment="rotate")


def test_rerun_resumes_and_continues_the_step_count(small_shards, tmp_path):
    train(small_config(tmp_path), small_shards, tmp_path, progress=False)
    first = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    done = train(small_config(tmp_path), small_shards, tmp_path, progress=False)
    assert done.images_per_s is None and done.steps == 4  # already complete: nothing ran
    more = train(small_config(tmp_path, steps=6), small_shards, tmp_path, progress=False)
    assert more.resumed_from == 4 and more.steps == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    resumed = load_checkpoint(more.checkpoint)
    assert not torch.equal(resumed["G"]["stem.0.weight"], first["G"]["stem.0.weight"])


def test_resume_after_a_kill_drops_metrics_rows_past_the_checkpoint(small_shards, tmp_path):
    train(small_config(tmp_path), small_shards, tmp_path, progress=False)
    (tmp_path / "checkpoints" / "ckpt-0000004.pt").unlink()  # as if killed between step 2's save and step 4's
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss')  # and a row cut short
    train(small_config(tmp_path), small_shards, tmp_path, progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_resume_refuses_a_checkpoint_of_another_model(small_shards, tmp_path):
    train(small_config(tmp_path), small_shards, tmp_path, progress=False)
    cfg = small_config(tmp_path, steps=6)
    cfg.model.g_width = 32
    with pytest.raises(DataError, match="different model or dataset"):
        train(cfg, small_shards, tmp_path, progress=False)


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w')",))

    path = tmp_path / "evil.pt"
    torch.save({"kind": "cgan-pipe-checkpoint", "version": 1, "x": Payload()}, path)
    with pytest.raises(DataError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_or_foreign_checkpoint_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="other.pt: not a cgan-pipe checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_the_resnet_model_trains_and_records_its_architecture(small_shards, tmp_path):
    cfg = small_config(tmp_path, steps=2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="resnet", g_width=32, d_width=32))
    result = train(cfg, small_shards, tmp_path, progress=False)
    assert result.steps == 2 and load_checkpoint(result.checkpoint)["config"]["model"]["arch"] == "resnet"

"""Schedules: the half cosine, the checks of their keys, and a training that follows them across a resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cgan_pipe.augment import diff_augment
from cgan_pipe.errors import ConfigError
from cgan_pipe.train.checkpoint import load_checkpoint
from cgan_pipe.train.loop import train
from cgan_pipe.train.schedule import half_cosine, penalised, values_at

from conftest import small_config

R3GAN_LIKE = {"lr_g": 5e-5, "lr_d": 5e-5, "r1_gamma": 0.005, "r2_gamma": 0.005, "beta2": 0.99}


def test_the_half_cosine_starts_at_start_ends_at_end_and_holds():
    assert half_cosine(2e-4, 5e-5, 0, 100) == 2e-4
    assert half_cosine(2e-4, 5e-5, 50, 100) == pytest.approx((2e-4 + 5e-5) / 2)
    assert half_cosine(2e-4, 5e-5, 100, 100) == half_cosine(2e-4, 5e-5, 1e9, 100) == 5e-5
    path = [half_cosine(0.9, 0.99, x, 100) for x in range(101)]
    assert all(a < b for a, b in zip(path, path[1:]))
    assert path[25] - path[0] < path[50] - path[25]  # slow at the ends, fastest in the middle


def test_only_the_keys_named_in_schedule_to_move(tmp_path):
    cfg = small_config(tmp_path, lr_g=2e-4, lr_d=2e-4, r1_gamma=0.05, beta2=0.9, schedule_kimg=10,
                       schedule_to={"lr_g": 5e-5, "r1_gamma": 0.005}).train
    start, end = values_at(cfg, 0), values_at(cfg, 10)
    assert (start.lr_g, start.r1_gamma, end.lr_g, end.r1_gamma) == (2e-4, 0.05, 5e-5, 0.005)
    assert start.lr_d == end.lr_d == 2e-4 and start.beta2 == end.beta2 == 0.9
    assert values_at(small_config(tmp_path).train, 123) == values_at(small_config(tmp_path).train, 0)


def test_a_penalty_scheduled_up_from_zero_still_gets_its_steps(tmp_path):
    assert not penalised(small_config(tmp_path).train)
    assert penalised(small_config(tmp_path, schedule_kimg=1, schedule_to={"r2_gamma": 0.1}).train)


@pytest.mark.parametrize("train_keys, message", [
    ({"schedule_to": {"lr_g": 1e-4}}, "train.schedule_to: a schedule needs both train.schedule_kimg"),
    ({"schedule_kimg": 100}, "train.schedule_kimg: a schedule needs both .* set train.schedule_to"),
    ({"schedule_kimg": 100, "schedule_to": {"lr": 1e-4}}, "train.schedule_to.lr: must be one of lr_g, lr_d"),
    ({"schedule_kimg": 100, "schedule_to": {"beta2": 1.5}}, r"train.schedule_to.beta2: must be in \[0, 1\)"),
    ({"schedule_kimg": 100, "schedule_to": {"lr_d": 0}}, "train.schedule_to.lr_d: must be > 0"),
    ({"augment_p": 0.5}, "train.augment_p: an augmentation probability needs transforms to apply; set "
                         "train.diffaugment"),
    ({"augment_p": 1.5, "diffaugment": "color"}, r"train.augment_p: must be in \[0, 1\]"),
])
def test_bad_schedules_name_the_key(tmp_path, train_keys, message):
    with pytest.raises(ConfigError, match=message):
        small_config(tmp_path, **train_keys)


def test_augment_p_applies_each_transform_to_that_share_of_the_images():
    torch.manual_seed(0)
    images = torch.rand(4000, 3, 8, 8) + 1  # no zeros: cutout changes every image it is applied to
    assert torch.equal(diff_augment(images, ("cutout",), 0.0), images)
    assert (diff_augment(images, ("cutout",), 1.0) != images).flatten(1).any(1).all()
    changed = (diff_augment(images, ("cutout",), 0.3) != images).flatten(1).any(1).float().mean().item()
    assert changed == pytest.approx(0.3, abs=0.03)


def _scheduled_rows(run_dir):
    keys = ("lr_g", "lr_d", "r1_gamma", "r2_gamma", "beta2", "augment_p")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], *(row[key] for key in keys)) for row in rows]


def test_training_follows_the_schedules_and_a_resume_continues_them(small_shards, tmp_path):
    # batch 16: 0.016 kimg a step, so the 0.064-kimg horizon is reached at step 5 (4 steps trained before it)
    keys = dict(steps=6, loss="rpgan", lr_g=2e-4, lr_d=2e-4, r1_gamma=0.05, r2_gamma=0.05, r1_every=2, beta2=0.9,
                diffaugment="translation", augment_p=0.0, schedule_kimg=0.064,
                schedule_to={**R3GAN_LIKE, "augment_p": 0.55}, log_every=1, checkpoint_every=3)
    whole = tmp_path / "whole"
    result = train(small_config(whole, **keys), small_shards, whole, progress=False)
    rows = _scheduled_rows(whole)
    assert [row[0] for row in rows] == [1, 2, 3, 4, 5, 6]
    lr_g = [row[1] for row in rows]
    assert lr_g[0] == 2e-4 and lr_g[4] == lr_g[5] == 5e-5
    assert lr_g[2] == pytest.approx(5e-5 + 1.5e-4 * (1 + math.cos(math.pi * 0.5)) / 2, rel=1e-5)
    assert all(a > b for a, b in zip(lr_g, lr_g[1:5]))
    assert rows[-1][1:] == (5e-5, 5e-5, 0.005, 0.005, 0.99, 0.55)
    # the optimisers ran at the scheduled values: D's adjusted for the lazy penalty step (every 2: x 2/3)
    state = load_checkpoint(result.checkpoint)
    assert state["opt_g"]["param_groups"][0]["lr"] == 5e-5
    assert state["opt_g"]["param_groups"][0]["betas"] == pytest.approx((0.0, 0.99))
    assert state["opt_d"]["param_groups"][0]["lr"] == pytest.approx(5e-5 * 2 / 3)
    assert state["opt_d"]["param_groups"][0]["betas"] == pytest.approx((0.0, 0.99 ** (2 / 3)))

    # stopped at step 3 and resumed: the same values at every step
    split = tmp_path / "split"
    train(small_config(split, **{**keys, "steps": 3}), small_shards, split, progress=False)
    train(small_config(split, **keys), small_shards, split, progress=False)
    assert _scheduled_rows(split) == rows

"""The GAN objective's phases: lazy R1's optimiser adjustment, and the losses on toy logits."""

from __future__ import annotations

import math

import pytest
import torch

from cgan_pipe.train.checkpoint import load_checkpoint
from cgan_pipe.train.loop import train
from cgan_pipe.train.loss import discriminator_loss, fake_loss, generator_loss, r1_adjusted

from conftest import small_config


def test_lazy_r1_scales_d_lr_and_betas_as_stylegan2_ada_does():
    lr, betas = r1_adjusted(0.0025, (0.0, 0.99), 16)
    assert lr == pytest.approx(0.0025 * 16 / 17)
    assert betas == pytest.approx((0.0, 0.99 ** (16 / 17)))
    assert r1_adjusted(0.0025, (0.5, 0.99), None) == (0.0025, (0.5, 0.99))


def test_training_with_r1_steps_d_with_the_adjusted_settings(small_shards, tmp_path):
    cfg = small_config(tmp_path, steps=2, r1_gamma=1.0, r1_every=4, lr_d=0.001, beta1=0.5, beta2=0.9)
    result = train(cfg, small_shards, tmp_path, progress=False)
    group = load_checkpoint(result.checkpoint)["opt_d"]["param_groups"][0]
    assert group["lr"] == pytest.approx(0.001 * 0.8)
    assert group["betas"] == pytest.approx((0.5 ** 0.8, 0.9 ** 0.8))
    plain = train(small_config(tmp_path / "plain", steps=2, lr_d=0.001), small_shards, tmp_path / "plain",
                  progress=False)
    assert load_checkpoint(plain.checkpoint)["opt_d"]["param_groups"][0]["lr"] == pytest.approx(0.001)


def test_losses_match_their_closed_forms_on_toy_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 3.0])
    hinge = (0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 4.0) / 3
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(hinge)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert discriminator_loss("nonsaturating", real, fake).item() == pytest.approx(
        sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 3)
    assert generator_loss("hinge", fake).item() == pytest.approx(-1 / 3)
    assert generator_loss("nonsaturating", fake).item() == pytest.approx(sum(softplus(-f) for f in fake.tolist()) / 3)
    keep = torch.tensor([True, False, True])
    assert fake_loss("hinge", fake, keep=keep).item() == pytest.approx((0 + 4.0) / 2)
    assert fake_loss("hinge", fake, keep=torch.zeros(3, dtype=torch.bool)).item() == 0.0

"""Hyperparameters that move as training goes (R3GAN's schedules): each key named in `train.schedule_to`
goes from its own value to the one given there along a half cosine over `train.schedule_kimg` thousand
real images, then holds. The position is the images trained on, a function of the step, so a resumed run
continues its schedules where the run before it stopped."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import torch

from ..config import ScheduledKey, TrainConfig

SCHEDULED: tuple[str, ...] = get_args(ScheduledKey)


@dataclass(frozen=True)
class Scheduled:
    """The values of the scheduled keys at one step."""

    lr_g: float
    lr_d: float
    r1_gamma: float
    r2_gamma: float
    beta2: float
    augment_p: float


def half_cosine(start: float, end: float, position: float, horizon: float) -> float:
    """`start` at position 0, `end` at `horizon` and after, along half a cosine between them."""
    if position >= horizon:
        return end
    return start + (end - start) * (1 - math.cos(math.pi * position / horizon)) / 2


def values_at(tc: TrainConfig, kimg: float) -> Scheduled:
    """The scheduled keys' values after `kimg` thousand real images (the keys' own values without a schedule)."""
    ends = tc.schedule_to or {}
    return Scheduled(**{key: half_cosine(getattr(tc, key), ends[key], kimg, tc.schedule_kimg) if key in ends
                        else getattr(tc, key) for key in SCHEDULED})


def kimg_trained(tc: TrainConfig, steps: int) -> float:
    """Thousands of real images D has trained on after `steps` steps, over all ranks."""
    return steps * tc.n_dis * tc.batch_size / 1000


def penalised(tc: TrainConfig) -> bool:
    """Whether the R1/R2 step runs at all: a penalty weight is above 0 at some point of the schedule."""
    ends = tc.schedule_to or {}
    return any(getattr(tc, key) > 0 or ends.get(key, 0) > 0 for key in ("r1_gamma", "r2_gamma"))


def optimiser_settings(tc: TrainConfig, values: Scheduled) -> tuple[tuple[float, tuple], tuple[float, tuple]]:
    """(lr, betas) of G's Adam and of D's at `values`; D's adjusted for the lazy penalty step (r1_adjusted)."""
    betas = (tc.beta1, values.beta2)
    return (values.lr_g, betas), r1_adjusted(values.lr_d, betas, tc.r1_every if penalised(tc) else None)


def r1_adjusted(lr: float, betas: tuple[float, float], every: int | None) -> tuple[float, tuple[float, float]]:
    """D's Adam learning rate and betas when the penalties are a step of their own every `every` steps
    (None: no penalty):
    both scaled by every / (every + 1), as StyleGAN2-ADA does (training_loop.py, `mb_ratio`), so that D's
    optimiser moves as far per image as it would without the extra steps."""
    if every is None:
        return lr, betas
    ratio = every / (every + 1)
    return lr * ratio, (betas[0] ** ratio, betas[1] ** ratio)


def set_optimisers(tc: TrainConfig, values: Scheduled, opt_g: torch.optim.Optimizer,
                   opt_d: torch.optim.Optimizer) -> None:
    """Give both Adams their lr and betas at `values` (python numbers: no device work)."""
    for optimiser, (lr, betas) in zip((opt_g, opt_d), optimiser_settings(tc, values)):
        for group in optimiser.param_groups:
            group["lr"], group["betas"] = lr, betas

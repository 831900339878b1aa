"""Optimiser steps that skip a non-finite loss on the device, with no host sync per step; ticks read the counts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import any_rank_on_device, average_gradients

# What each guarded step optimises, as named in error messages; a loss's index here is how the device records it.
PHASES = ("the discriminator loss", "the R1/R2 penalty", "the generator loss")


def make_adam(module: nn.Module, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam over `module`'s parameters, fused: one kernel per step (about 7x faster than the per-tensor
    loop on a CPU, docs/benchmarks.md), and a step it can skip on the device (see StepGuard)."""
    return torch.optim.Adam(module.parameters(), lr=lr, betas=betas, fused=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a checkpointed optimizer state (read on the CPU) into `optimizer`, keeping the implementation
    it was built with (fused, foreach, capturable): load_state_dict would otherwise take the saved ones, and
    with them where Adam keeps its step counters (on the CPU when not fused: a host read per parameter per
    step once they sit on a GPU)."""
    implementation = ("fused", "foreach", "capturable", "differentiable")
    groups = [{**group, **{key: ours[key] for key in implementation if key in ours}}
              for group, ours in zip(saved["param_groups"], optimizer.param_groups, strict=True)]
    optimizer.load_state_dict({**saved, "param_groups": groups})


@dataclass(frozen=True)
class GuardReport:
    """What the guard saw since training started in this process, read at a tick."""

    skipped: int  # steps in which at least one update was skipped
    longest_run: int  # the most such steps in a row
    first: tuple[int, str, float] | None  # step, loss name and value of the first non-finite loss


class StepGuard:
    """Backward, gradient averaging over ranks and the optimiser step of each phase, skipping the step
    whose loss is not finite, decided on the device: the step reads no value back to the host.

    Without loss scaling the skip goes through the fused optimiser's `found_inf` input, the one
    torch.amp.GradScaler feeds it (torch/amp/grad_scaler.py, `_step_supports_amp_scaling`). With fp16
    loss scaling the GradScaler skips any step whose gradients are not finite; a non-finite loss is made
    to have such gradients (NaN as the backward's seed), so both precisions skip the same steps. The
    counts stay on the device until `read`, once per tick.
    """

    def __init__(self, device: torch.device, world: int, scaler: torch.amp.GradScaler):
        self.world, self.scaler = world, scaler
        self._step_bad = torch.zeros((), dtype=torch.bool, device=device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._run = torch.zeros((), dtype=torch.int64, device=device)
        self._longest = torch.zeros((), dtype=torch.int64, device=device)
        self._first = torch.full((3,), math.nan, dtype=torch.float64, device=device)  # step, phase, value

    def step(self, loss: torch.Tensor, module: nn.Module, optimizer: torch.optim.Optimizer, phase: str,
             step: int) -> None:
        """Backpropagate `loss`, average `module`'s gradients over the ranks, and step `optimizer`
        unless the loss is not finite on some rank (then every rank skips)."""
        value = loss.detach()
        bad = any_rank_on_device(~torch.isfinite(value), self.world)
        optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            loss = loss * torch.where(bad, math.nan, 1.0)
        self.scaler.scale(loss).backward()
        average_gradients(module, self.world)
        if self.scaler.is_enabled():
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.found_inf = bad.float()
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        record = torch.stack([torch.full((), float(number), dtype=torch.float64, device=value.device)  # fills, not
                              for number in (step, PHASES.index(phase))] + [value.double()])  # copies from the host
        self._first = torch.where(bad & self._first[0].isnan(), record, self._first)
        self._step_bad |= bad

    def end_step(self) -> None:
        """Close a training step: count it if any of its updates was skipped."""
        bad = self._step_bad.long()
        self._skipped += bad
        self._run = (self._run + 1) * bad
        self._longest = torch.maximum(self._longest, self._run)
        self._step_bad.zero_()

    def read(self, *values: torch.Tensor) -> tuple[GuardReport, list[float]]:
        """The counts so far, and `values` (scalar tensors, e.g. the last losses) as floats: one host read."""
        numbers = torch.cat([torch.stack([self._skipped, self._longest]).double(), self._first,
                             *(v.detach().double().reshape(1) for v in values)]).tolist()
        skipped, longest, first_step, first_phase, first_value = numbers[:5]
        first = None if math.isnan(first_step) else (int(first_step), PHASES[int(first_phase)], first_value)
        return GuardReport(int(skipped), int(longest), first), numbers[5:]


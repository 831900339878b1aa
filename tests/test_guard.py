"""The step guard: a non-finite loss changes no weight and no optimiser state, and is counted on the device."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cgan_pipe.train.guard import StepGuard, load_optimizer_state, make_adam

CPU = torch.device("cpu")


@pytest.mark.parametrize("scaled", [False, True], ids=["no-scaling", "fp16-grad-scaler"])
def test_a_non_finite_loss_is_skipped_without_touching_the_weights_and_is_counted(scaled):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = make_adam(model, 0.1, (0.0, 0.99))
    guard = StepGuard(CPU, 1, torch.amp.GradScaler("cpu", enabled=scaled))
    x = torch.randn(4, 3)
    for step, poison in ((1, 1.0), (2, math.inf), (3, math.nan), (4, 1.0)):
        before = [p.detach().clone() for p in model.parameters()]
        guard.step(model(x).square().mean() * poison, model, optimizer, "the generator loss", step)
        guard.end_step()
        changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert changed == (poison == 1.0), step
    assert all(state["step"].item() == 2 for state in optimizer.state.values())  # steps 1 and 4 only
    report, values = guard.read(torch.tensor(0.5))
    assert (report.skipped, report.longest_run) == (2, 2) and values == [0.5]
    assert report.first == (2, "the generator loss", math.inf)


def test_loading_an_optimizer_state_keeps_the_implementation_it_was_built_with():
    model = nn.Linear(3, 1)
    per_tensor = torch.optim.Adam(model.parameters(), foreach=False)
    model(torch.randn(2, 3)).sum().backward()
    per_tensor.step()
    fused = make_adam(model, 1e-3, (0.0, 0.99))
    load_optimizer_state(fused, per_tensor.state_dict())
    assert fused.param_groups[0]["fused"] is True and fused.param_groups[0]["foreach"] is None
    assert all(state["step"].item() == 1 for state in fused.state.values())


def test_with_several_d_updates_a_step_whose_first_d_update_is_skipped_is_counted():
    torch.manual_seed(0)
    d, g = nn.Linear(3, 1), nn.Linear(3, 1)
    opt_d, opt_g = make_adam(d, 0.1, (0.0, 0.99)), make_adam(g, 0.1, (0.0, 0.99))
    guard = StepGuard(CPU, 1, torch.amp.GradScaler("cpu", enabled=False))
    x = torch.randn(4, 3)
    for step in (1, 2):
        for update in range(2):  # n_dis = 2: only step 1's first D update is poisoned
            poison = math.nan if (step, update) == (1, 0) else 1.0
            guard.step(d(x).square().mean() * poison, d, opt_d, "the discriminator loss", step)
        guard.step(g(x).square().mean(), g, opt_g, "the generator loss", step)
        guard.end_step()
    report, _ = guard.read()
    assert (report.skipped, report.longest_run) == (1, 1)
    assert report.first[:2] == (1, "the discriminator loss")

"""Exponential moving average of the generator's weights, with BatchNorm statistics of its own."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# A checkpoint's "ema_batchnorm": its G_ema's BatchNorm statistics were measured on G_ema's own activations
# (checkpoints without it hold G's, which load_generator replaces).
OWN_STATISTICS = "own"


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int, warmup: int = 10) -> None:
    """Move `ema`'s parameters towards `model`'s. Buffers are left alone: the trained model's BatchNorm
    statistics do not fit the averaged weights, so `recompute_batchnorm` sets them before `ema` is used.

    The decay warms up as min(decay, (1 + step) / (warmup + step)) so early averages are not
    dominated by the random initialisation (warmup 0: the full decay from the first step). One
    multi-tensor kernel per group rather than one per parameter.
    """
    beta = min(decay, (1 + step) / (warmup + step)) if warmup else decay
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - beta)


@torch.no_grad()
def recompute_batchnorm(generator: nn.Module, inputs: Sequence[tuple]) -> None:
    """Set the running mean and variance of every BatchNorm in `generator` to their average over its
    forward passes on `inputs` (each a tuple of its arguments), as BigGAN's "standing statistics" do,
    and leave it in eval mode. Without this an EMA generator normalises with the statistics of another
    network's activations: on CIFAR-10 its feature distance was about twice as large (docs/benchmarks.md)."""
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the passes
    generator.train()
    try:
        for args in inputs:
            generator(*args)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        generator.eval()


def standing_inputs(G: nn.Module, num_classes: int, batch_size: int, seed: int, device: torch.device,
                    qualities: list[int] | None, batches: int = 32) -> list[tuple]:
    """Fixed inputs of generator `G` on which `recompute_batchnorm` measures the statistics: `batches`
    batches of the training batch size, latents and classes drawn as in the G phase (class 0 for
    unlabelled data) and, when G is quality-conditioned, qualities drawn from the trained `qualities`."""
    z_dim, n_classes = G.z_dim, max(num_classes, 1)
    qualities = qualities if G.quality_conditioned else None
    generator = torch.Generator().manual_seed(seed)
    levels = torch.tensor(qualities, dtype=torch.float32) / 100 if qualities is not None else None
    inputs = []
    for _ in range(batches):
        z = torch.randn(batch_size, z_dim, generator=generator)
        labels = torch.randint(0, n_classes, (batch_size,), generator=generator)
        quality = levels[torch.randint(0, len(levels), (batch_size,), generator=generator)].to(device) \
            if levels is not None else None
        inputs.append((z.to(device), labels.to(device), quality))
    return inputs

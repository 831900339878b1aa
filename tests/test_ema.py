"""The EMA generator: averaged weights, and BatchNorm statistics measured on its own activations."""

from __future__ import annotations

import copy

import torch
from torch import nn

from cgan_pipe.generation import load_generator
from cgan_pipe.models import dcgan
from cgan_pipe.train.checkpoint import load_checkpoint
from cgan_pipe.train.ema import recompute_batchnorm, update_ema
from cgan_pipe.train.loop import train

from conftest import small_config


def _inputs_of(name: str, network: nn.Module, inputs: list[tuple]) -> list[torch.Tensor]:
    """What module `name` receives, per batch, when a copy of `network` runs in train mode on `inputs`
    (a copy: train mode updates BatchNorm statistics)."""
    network = copy.deepcopy(network).train()
    seen = []
    dict(network.named_modules())[name].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        for args in inputs:
            network(*args)
    return seen


def test_update_ema_averages_weights_and_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = dcgan.Generator(16, 10, 32, 3, 32)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
        for buffer in model.buffers():
            buffer.add_(3)
    before = [b.clone() for b in ema.buffers()]
    first = next(ema.parameters()).clone()
    update_ema(ema, model, decay=0.9, step=1000)
    assert torch.allclose(next(ema.parameters()), first + 0.1)
    assert all(torch.equal(a, b) for a, b in zip(ema.buffers(), before))


def test_recomputed_statistics_are_the_mean_over_the_networks_own_batches():
    torch.manual_seed(0)
    ema = dcgan.Generator(16, 10, 32, 3, 32)
    norms = {name: m for name, m in ema.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for norm in norms.values():  # statistics of another network: far from these weights' own
        norm.running_mean.fill_(5.0)
        norm.running_var.fill_(9.0)
    inputs = [(torch.randn(32, 16), torch.randint(0, 10, (32,)), None) for _ in range(3)]
    recompute_batchnorm(ema, inputs)
    assert not ema.training and all(norm.momentum == 0.1 for norm in norms.values())
    for name, norm in norms.items():
        batches = _inputs_of(name, ema, inputs)
        means = torch.stack([b.mean((0, 2, 3)) for b in batches])
        variances = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches])
        assert torch.allclose(norm.running_mean, means.mean(0), atol=1e-5)
        assert torch.allclose(norm.running_var, variances.mean(0), rtol=1e-4, atol=1e-6)


def test_a_trained_ema_generator_is_saved_with_statistics_of_its_own_activations(small_shards, tmp_path):
    # A fast-moving G and a slow EMA: their activations differ, so copied statistics would be far off.
    cfg = small_config(tmp_path, steps=6, lr_g=0.02, ema_decay=0.999, ema_warmup=0)
    state = load_checkpoint(train(cfg, small_shards, tmp_path, progress=False).checkpoint)
    ema, _, z_dim = load_generator(state, ema=True, device=torch.device("cpu"), fast=False)
    raw, _, _ = load_generator(state, ema=False, device=torch.device("cpu"), fast=False)
    generator = torch.Generator().manual_seed(1)
    inputs = [(torch.randn(256, z_dim, generator=generator), torch.randint(0, 10, (256,), generator=generator))]
    own, copied = [], []
    for name, norm in ema.named_modules():
        if isinstance(norm, nn.BatchNorm2d):
            measured = _inputs_of(name, ema, inputs)[0].var((0, 2, 3))
            own.append((norm.running_var / measured).log().abs().mean())
            copied.append((dict(raw.named_modules())[name].running_var / measured).log().abs().mean())
    assert max(own) < 0.1 < min(copied), (own, copied)


def test_an_older_checkpoint_with_copied_statistics_gets_the_ema_generators_own_when_loaded(small_shards, tmp_path):
    cfg = small_config(tmp_path, steps=6, lr_g=0.02, ema_decay=0.999, ema_warmup=0)
    state = load_checkpoint(train(cfg, small_shards, tmp_path, progress=False).checkpoint)
    older = {**state, "G_ema": dict(state["G_ema"])}
    del older["ema_batchnorm"]  # what checkpoints written before it looked like: G's statistics in G_ema
    for key, value in state["G"].items():
        if "running_" in key:
            older["G_ema"][key] = value.clone()
    cpu = torch.device("cpu")
    loaded = load_generator(older, ema=True, device=cpu, fast=False)[0].state_dict()
    saved = load_generator(state, ema=True, device=cpu, fast=False)[0].state_dict()
    stats = [key for key in saved if "running_" in key]
    assert stats and not all(torch.allclose(older["G_ema"][key], saved[key], rtol=0.05) for key in stats)
    for key in stats:  # measured on the same fixed inputs as training measures them
        assert torch.allclose(loaded[key], saved[key], rtol=1e-4, atol=1e-6), key

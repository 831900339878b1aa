"""A trained generator from a checkpoint, and images from it by seed: what export, evaluation and the
benchmarks all generate with."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import config_from_dict
from .data.batch import DatasetInfo
from .errors import ConfigError
from .images import to_uint8
from .models import build_networks, check_fits, for_inference
from .train.checkpoint import load_weights
from .train.ema import OWN_STATISTICS, recompute_batchnorm, standing_inputs


def load_generator(state: dict, ema: bool, device: torch.device,
                   fast: bool = True) -> tuple[nn.Module, DatasetInfo, int]:
    """Build the (EMA or raw) generator stored in a checkpoint, in eval mode and, unless `fast` is
    False (the network exactly as trained, for comparisons), made ready for inference by
    `models.for_inference`; returns (G, dataset info, z_dim). An EMA generator from a checkpoint written
    before its BatchNorm statistics were its own gets them measured here."""
    cfg = config_from_dict(state["config"], origin="checkpoint config")
    info = checkpoint_dataset(state)
    check_fits(cfg.model, info, cfg.compression, device, training=False)
    generator, _ = build_networks(cfg.model, info, cfg.compression)
    load_weights(generator, state, "G_ema" if ema else "G", "the checkpoint")
    generator = generator.to(device).eval().requires_grad_(False)
    if ema and state.get("ema_batchnorm") != OWN_STATISTICS:  # written before the EMA had statistics of its own
        recompute_batchnorm(generator, standing_inputs(generator, info.num_classes, cfg.train.batch_size, cfg.seed,
                                                       device, state["dataset"].get("qualities")))
    return for_inference(generator) if fast else generator, info, cfg.model.z_dim


def checkpoint_dataset(state: dict) -> DatasetInfo:
    """The shape and classes of the data a checkpoint was trained on."""
    ds = state["dataset"]
    return DatasetInfo(ds["resolution"], ds["channels"], tuple(ds["class_names"]), 0)


def requested_quality(state: dict, quality_cond: int | None, checkpoint: Path) -> int | None:
    """The quality to condition the checkpoint's generator on: `quality_cond`, or the highest it was
    trained on when that is None; None for a model without quality conditioning (ConfigError when one
    was asked of it)."""
    mode = state["config"].get("compression", {}).get("mode", "none")
    if mode != "condition":
        if quality_cond is not None:
            raise ConfigError(f"{checkpoint}: this model was trained without quality conditioning (compression.mode: "
                              f"{mode}), so it cannot be asked for a quality; leave out --quality-cond "
                              f"(export.quality_cond)")
        return None
    if quality_cond is None:
        return max(state["dataset"].get("qualities") or [100])
    return quality_cond


def latents(seeds: list[int], z_dim: int, truncation: float | None = None) -> torch.Tensor:
    """One latent per seed, (N, z_dim), each drawn from N(0, I) with its own seed, so that an image
    does not depend on the batch it is generated in. With `truncation`, components beyond
    +-truncation are redrawn (the truncation trick of BigGAN: https://arxiv.org/abs/1809.11096)."""
    rows = []
    for seed in seeds:
        rng = torch.Generator().manual_seed(seed)
        z = torch.randn(z_dim, generator=rng)
        if truncation is not None:
            outside = z.abs() > truncation
            while outside.any():
                z[outside] = torch.randn(int(outside.sum()), generator=rng)
                outside = z.abs() > truncation
        rows.append(z)
    return torch.stack(rows)


@torch.no_grad()
def generate(G: nn.Module, z_dim: int, seeds: list[int], labels: torch.Tensor, device: torch.device,
             quality: int | torch.Tensor | None = None, truncation: float | None = None) -> torch.Tensor:
    """Images for the given seeds and class ids as uint8 RGB, NCHW, on `device`; a quality-conditioned
    G is asked for JPEG `quality` (1-100: one for all, or one per image)."""
    z = latents(seeds, z_dim, truncation)
    if quality is not None:
        quality = torch.as_tensor(quality, dtype=torch.float32).expand(len(seeds)).div(100).to(device)
    out = G(z.to(device), labels.to(device), quality).float()
    # NHWC memory (channels last): what the encoders read, so they copy nothing
    return to_uint8(out).contiguous(memory_format=torch.channels_last)

"""Network families; `build_networks` picks one from the config and the data's shape."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..config import CompressionConfig, ModelConfig
from ..data.batch import DatasetInfo
from ..devices import available_memory, gib
from ..errors import ConfigError
from . import dcgan, r3gan, resnet


def build_networks(cfg: ModelConfig, info: DatasetInfo,
                   compression: CompressionConfig | None = None) -> tuple[nn.Module, nn.Module]:
    """Generator and discriminator for `cfg.arch`, sized from the dataset's resolution and classes;
    both also conditioned on JPEG quality in compression mode 'condition' (G then ending with the
    differentiable JPEG codec when compression.condition_output is 'jpeg'), D alone with
    compression.ambient_d_quality in mode 'ambient'."""
    quality = compression is not None and compression.mode == "condition"
    judges_quality = quality or (compression is not None and compression.mode == "ambient"
                                 and compression.ambient_d_quality)
    jpeg = quality and compression.condition_output == "jpeg"
    families = {"dcgan": dcgan, "resnet": resnet, "r3gan": r3gan}
    if cfg.arch in families:
        family = families[cfg.arch]
        generator = family.Generator(cfg.z_dim, info.num_classes, info.resolution, info.channels, cfg.g_width,
                                     quality=quality, jpeg=jpeg)
        discriminator = family.Discriminator(info.num_classes, info.resolution, info.channels, cfg.d_width,
                                             quality=judges_quality)
        return generator, discriminator
    raise ValueError(f"unknown architecture {cfg.arch!r}")  # config validation admits only known ones


def check_fits(cfg: ModelConfig, info: DatasetInfo, compression: CompressionConfig | None, device: torch.device,
               training: bool) -> None:
    """ConfigError naming model.g_width and model.d_width when the networks' weights alone, with (for
    `training`) their gradients, Adam's two moments and G's EMA copy, would take more memory than `device`
    has free: networks made from a mistyped width would otherwise try to allocate all of it. They are sized
    on the meta device, which allocates nothing."""
    params, need = weight_bytes(cfg, info, compression, training)
    free = available_memory(device)
    if need > free:
        raise ConfigError(f"model.g_width {cfg.g_width}, model.d_width {cfg.d_width}: the {cfg.arch} networks would "
                          f"hold {params:,} parameters, {gib(need)} with what "
                          f"{'training' if training else 'generating'} keeps of them, more than the "
                          f"{gib(free)} free on {device.type}; lower the widths")


def weight_bytes(cfg: ModelConfig, info: DatasetInfo, compression: CompressionConfig | None,
                 training: bool) -> tuple[int, int]:
    """(parameters, bytes) of the two networks: their float32 weights and, for `training`, their gradients,
    Adam's two moments and G's EMA copy. Sized on the meta device, which allocates nothing."""
    with torch.device("meta"):
        generator, discriminator = build_networks(cfg, info, compression)
    g_params, d_params = (sum(p.numel() for p in net.parameters()) for net in (generator, discriminator))
    return g_params + d_params, 4 * (g_params * 5 + d_params * 4 if training else g_params + d_params)


def for_inference(generator: nn.Module) -> nn.Module:
    """`generator`, in place, made ready to generate and nothing else: eval mode, no gradients, every
    BatchNorm that directly follows a (transposed) convolution folded into its weights, and channels-last
    memory. Images agree with the unfolded network to float rounding; the DCGAN runs ~2.6x faster on a
    CPU (docs/benchmarks.md)."""
    generator.eval().requires_grad_(False)
    for module in list(generator.modules()):
        if isinstance(module, nn.Sequential):
            _fold_batchnorm(module)
    return generator.to(memory_format=torch.channels_last)


def _fold_batchnorm(sequence: nn.Sequential) -> None:
    layers = list(sequence)
    for i, (layer, after) in enumerate(zip(layers, layers[1:])):
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(after, nn.BatchNorm2d):
            sequence[i] = fuse_conv_bn_eval(layer, after, transpose=isinstance(layer, nn.ConvTranspose2d))
            sequence[i + 1] = nn.Identity()

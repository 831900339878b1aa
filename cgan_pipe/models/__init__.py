"""Network families; `build_networks` picks one from the config and the data's shape."""

from __future__ import annotations

from torch import nn

from ..config import CompressionConfig, ModelConfig
from ..data.loader import DatasetInfo
from . import dcgan, resnet


def build_networks(cfg: ModelConfig, info: DatasetInfo,
                   compression: CompressionConfig | None = None) -> tuple[nn.Module, nn.Module]:
    """Generator and discriminator for `cfg.arch`, sized from the dataset's resolution and classes;
    both also conditioned on JPEG quality in compression mode 'condition' (G then ending with the
    differentiable JPEG codec when compression.condition_output is 'jpeg')."""
    quality = compression is not None and compression.mode == "condition"
    jpeg = quality and compression.condition_output == "jpeg"
    if cfg.arch in ("dcgan", "resnet"):
        family = dcgan if cfg.arch == "dcgan" else resnet
        generator = family.Generator(cfg.z_dim, info.num_classes, info.resolution, info.channels, cfg.g_width,
                                     quality=quality, jpeg=jpeg)
        discriminator = family.Discriminator(info.num_classes, info.resolution, info.channels, cfg.d_width,
                                             quality=quality)
        return generator, discriminator
    raise ValueError(f"unknown architecture {cfg.arch!r}")  # config validation admits only known ones

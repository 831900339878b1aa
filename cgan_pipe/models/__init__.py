"""Network families; `build_networks` picks one from the config and the data's shape."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from ..data.loader import DatasetInfo
from . import dcgan, resnet


def build_networks(cfg: ModelConfig, info: DatasetInfo) -> tuple[nn.Module, nn.Module]:
    """Generator and discriminator for `cfg.arch`, sized from the dataset's resolution and classes."""
    if cfg.arch == "dcgan":
        generator = dcgan.Generator(cfg.z_dim, info.num_classes, info.resolution, info.channels, cfg.g_width)
        discriminator = dcgan.Discriminator(info.num_classes, info.resolution, info.channels, cfg.d_width)
        return generator, discriminator
    if cfg.arch == "resnet":
        generator = resnet.Generator(cfg.z_dim, info.num_classes, info.resolution, info.channels, cfg.g_width)
        discriminator = resnet.Discriminator(info.num_classes, info.resolution, info.channels, cfg.d_width)
        return generator, discriminator
    raise ValueError(f"unknown architecture {cfg.arch!r}")  # config validation admits only known ones

"""DCGAN networks: shapes for each resolution, conditional and unconditional."""

from __future__ import annotations

import pytest
import torch

from cgan_pipe.config import ModelConfig
from cgan_pipe.data.loader import DatasetInfo
from cgan_pipe.models import build_networks


@pytest.mark.parametrize("resolution", [8, 32, 64])
@pytest.mark.parametrize("classes", [0, 10])
def test_generator_and_discriminator_shapes(resolution, classes):
    info = DatasetInfo(resolution, 3, tuple(f"c{i}" for i in range(classes)), 100)
    G, D = build_networks(ModelConfig(z_dim=16, g_width=64, d_width=64), info)
    labels = torch.randint(0, max(classes, 1), (4,))
    images = G(torch.randn(4, 16), labels)
    assert images.shape == (4, 3, resolution, resolution)
    assert images.min() >= -1 and images.max() <= 1
    logits = D(images, labels)
    assert logits.shape == (4,)


def test_discriminator_uses_the_class():
    info = DatasetInfo(32, 3, tuple("abc"), 100)
    _, D = build_networks(ModelConfig(d_width=64), info)
    D.eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(D(x, torch.tensor([0, 0])), D(x, torch.tensor([1, 2])))

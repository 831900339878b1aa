"""DCGAN networks: shapes for each resolution, conditional and unconditional."""

from __future__ import annotations

import pytest
import torch

from cgan_pipe.config import ModelConfig
from cgan_pipe.data.loader import DatasetInfo
from cgan_pipe.models import build_networks
from cgan_pipe.models.resnet import ConditionalBatchNorm


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
@pytest.mark.parametrize("resolution", [8, 32, 64])
@pytest.mark.parametrize("classes", [0, 10])
def test_generator_and_discriminator_shapes(arch, resolution, classes):
    info = DatasetInfo(resolution, 3, tuple(f"c{i}" for i in range(classes)), 100)
    G, D = build_networks(ModelConfig(arch=arch, z_dim=16, g_width=32, d_width=32), info)
    labels = torch.randint(0, max(classes, 1), (4,))
    images = G(torch.randn(4, 16), labels)
    assert images.shape == (4, 3, resolution, resolution)
    assert images.min() >= -1 and images.max() <= 1
    logits = D(images, labels)
    assert logits.shape == (4,)


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_discriminator_uses_the_class(arch):
    info = DatasetInfo(32, 3, tuple("abc"), 100)
    _, D = build_networks(ModelConfig(arch=arch, d_width=64), info)
    D.eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(D(x, torch.tensor([0, 0])), D(x, torch.tensor([1, 2])))


def test_the_resnet_generator_is_conditioned_through_its_batchnorm():
    info = DatasetInfo(32, 3, tuple("abc"), 100)
    G, _ = build_networks(ModelConfig(arch="resnet", z_dim=16, g_width=32), info)
    for module in G.modules():  # conditional BN starts as plain BN (zero init): give the class path weight
        if isinstance(module, ConditionalBatchNorm):
            torch.nn.init.normal_(module.affine.weight, std=0.5)
    G.eval()  # running statistics: two samples with the same z differ only by their class
    images = G(torch.randn(1, 16).repeat(2, 1), torch.tensor([0, 1]))
    assert not torch.allclose(images[0], images[1])


def test_the_resnet_discriminator_is_spectrally_normalised_everywhere():
    _, D = build_networks(ModelConfig(arch="resnet", d_width=32), DatasetInfo(32, 3, tuple("ab"), 10))
    weighted = [m for m in D.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding))]
    assert weighted and all(hasattr(m, "weight_orig") for m in weighted)

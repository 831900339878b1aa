"""The network families: shapes for each resolution, conditional and unconditional, and their channel plans."""

from __future__ import annotations

import pytest
import torch

from cgan_pipe.config import CompressionConfig, ModelConfig
from cgan_pipe.data.batch import DatasetInfo
from cgan_pipe.models import build_networks, check_fits
from cgan_pipe.errors import ConfigError
from cgan_pipe.models.resnet import ConditionalBatchNorm
from cgan_pipe.models.sizes import channel_plan


@pytest.mark.parametrize("arch", ["dcgan", "resnet", "r3gan"])
@pytest.mark.parametrize("resolution", [8, 32, 64, 128, 256])
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


@pytest.mark.parametrize("arch", ["dcgan", "resnet", "r3gan"])
def test_discriminator_uses_the_class(arch):
    info = DatasetInfo(32, 3, tuple("abc"), 100)
    _, D = build_networks(ModelConfig(arch=arch, d_width=64), info)
    D.eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(D(x, torch.tensor([0, 0])), D(x, torch.tensor([1, 2])))


@pytest.mark.parametrize("arch", ["dcgan", "resnet", "r3gan"])
def test_the_class_logits_are_the_projection_terms_of_every_class(arch):
    info = DatasetInfo(32, 3, tuple("abcd"), 100)
    _, D = build_networks(ModelConfig(arch=arch, d_width=32), info)
    D.eval()
    x, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 2, 3])
    logits, classes = D(x, labels, classes=True)
    assert classes.shape == (3, 4)
    torch.testing.assert_close(logits, D(x, labels))
    for c in range(4):  # the realness logit moves with the class by exactly the class logits' differences
        other = D(x, torch.full((3,), c))
        torch.testing.assert_close(other - logits, classes[:, c] - classes[torch.arange(3), labels],
                                   rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
@pytest.mark.parametrize("classes", [0, 10])
def test_quality_conditioned_networks_use_the_quality_and_insist_on_getting_one(arch, classes):
    info = DatasetInfo(32, 3, tuple(f"c{i}" for i in range(classes)), 100)
    torch.manual_seed(0)
    learned = CompressionConfig(mode="condition", condition_output="learned")
    G, D = build_networks(ModelConfig(arch=arch, z_dim=16, g_width=32, d_width=32), info, learned)
    G.eval()  # BatchNorm on running statistics: each image depends on its own inputs only
    z, labels = torch.randn(1, 16).repeat(2, 1), torch.zeros(2, dtype=torch.int64)
    if arch == "resnet":  # its CBN gains start at zero: give them weights, as training would
        for module in G.modules():
            if isinstance(module, ConditionalBatchNorm) and module.affine is not None:
                torch.nn.init.normal_(module.affine.weight, std=0.5)
    images = G(z, labels, torch.tensor([0.1, 0.9]))
    assert not torch.allclose(images[0], images[1])  # same latent and class, another quality
    logits = D(images[:1].repeat(2, 1, 1, 1), labels, torch.tensor([0.1, 0.9]))
    assert logits[0] != logits[1]
    with pytest.raises(ValueError, match="conditioned on JPEG quality"):
        G(z, labels)
    plain, _ = build_networks(ModelConfig(arch=arch, z_dim=16, g_width=32, d_width=32), info)
    with pytest.raises(ValueError, match="built without quality conditioning"):
        plain(z, labels, torch.tensor([0.1, 0.9]))


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_a_jpeg_output_generator_is_its_network_followed_by_the_differentiable_codec(arch):
    from cgan_pipe.compression import simulate_jpeg

    info = DatasetInfo(32, 3, tuple("abc"), 100)
    G, _ = build_networks(ModelConfig(arch=arch, z_dim=16, g_width=32, d_width=32), info,
                          CompressionConfig(mode="condition"))  # condition_output: jpeg, the default
    G.eval()
    z, labels, quality = torch.randn(2, 16), torch.tensor([0, 2]), torch.tensor([0.1, 0.8])
    coded = G(z, labels, quality)
    G.jpeg = False
    assert torch.allclose(coded, simulate_jpeg(G(z, labels, quality), quality * 100), atol=1e-5)
    coded.sum().backward()  # the codec passes gradients back to the network
    assert G.to_rgb[0].weight.grad is not None if arch == "dcgan" else G.to_rgb[2].weight.grad is not None


def test_channel_plans_narrow_as_the_resolution_grows():
    assert channel_plan("dcgan", 128, 32) == [128, 64, 32, 32]
    assert channel_plan("resnet", 256, 32) == [256, 256, 256, 256]  # CIFAR-10's networks are unchanged
    assert channel_plan("resnet", 256, 256) == [256, 256, 256, 256, 128, 64, 32]
    assert channel_plan("resnet", 64, 256)[-1] == 32  # never below 32


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_networks_follow_their_channel_plan(arch):
    plan = channel_plan(arch, 128, 128)
    G, D = build_networks(ModelConfig(arch=arch, g_width=128, d_width=128), DatasetInfo(128, 3, (), 100))
    to_rgb = [m for m in G.to_rgb.modules() if isinstance(m, torch.nn.Conv2d)][0]
    assert to_rgb.in_channels == plan[-1] < plan[0]  # the full-size maps are the narrow ones
    first = [m for m in D.modules() if isinstance(m, torch.nn.Conv2d)][0]
    assert first.in_channels == 3 and first.out_channels <= plan[1]


def test_a_checkpoint_of_other_shapes_is_refused_naming_the_file(tmp_path):
    from cgan_pipe.errors import DataError
    from cgan_pipe.train.checkpoint import load_weights

    narrow, _ = build_networks(ModelConfig(g_width=32), DatasetInfo(32, 3, (), 100))
    wide, _ = build_networks(ModelConfig(g_width=64), DatasetInfo(32, 3, (), 100))
    with pytest.raises(DataError, match=r"ckpt.pt: its G does not fit the network this config builds \(.*size"):
        load_weights(wide, {"G": narrow.state_dict()}, "G", tmp_path / "ckpt.pt")


def test_every_r3gan_residual_block_starts_as_the_identity():
    from cgan_pipe.models.r3gan import ResidualBlock

    G, D = build_networks(ModelConfig(arch="r3gan", z_dim=16, g_width=64, d_width=64), DatasetInfo(32, 3, ("a",), 10))
    blocks = [m for m in (*G.modules(), *D.modules()) if isinstance(m, ResidualBlock)]
    assert len(blocks) == 2 * 2 * 4  # two per stage, four stages (4 to 32 px), in G and in D
    x = torch.randn(2, 64, 8, 8)
    assert all(torch.equal(block(x), x) for block in blocks)
    odd, _ = build_networks(ModelConfig(arch="r3gan", z_dim=16, g_width=50), DatasetInfo(16, 3, (), 10))
    assert odd(torch.randn(2, 16), torch.zeros(2, dtype=torch.int64)).shape == (2, 3, 16, 16)  # any width
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm))
                   for m in (*G.modules(), *D.modules()))  # normalisation-free


@pytest.mark.parametrize("arch", ["dcgan", "resnet", "r3gan"])
def test_networks_too_large_for_the_memory_are_refused_before_anything_is_allocated(arch):
    info = DatasetInfo(32, 3, tuple(f"c{i}" for i in range(10)), 100)
    with pytest.raises(ConfigError, match=rf"model.g_width 100000000, model.d_width 128: the {arch} networks would "
                                          r"hold [\d,]+ parameters, [\d,.]+ GiB with what training keeps of them, more "
                                          r"than the [\d,.]+ GiB free on cpu; lower the widths"):
        check_fits(ModelConfig(arch=arch, g_width=100_000_000), info, None, torch.device("cpu"), training=True)
    check_fits(ModelConfig(arch=arch), info, None, torch.device("cpu"), training=True)  # the defaults fit

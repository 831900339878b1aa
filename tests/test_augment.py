"""DiffAugment: shapes kept, each transform does what it says, gradients flow, bad names refused."""

from __future__ import annotations

import pytest
import torch

from cgan_pipe.augment import diff_augment, parse_policy


def images(n: int = 8) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(n, 3, 32, 32) * 2 - 1


def test_translation_shifts_whole_images_and_fills_with_zeros():
    x = images()
    out = diff_augment(x, ("translation",))
    assert out.shape == x.shape
    for original, moved in zip(x, out):
        # some shift (dy, dx) within 4 pixels maps the original onto the result exactly
        assert any(torch.equal(torch.nn.functional.pad(original, (4, 4, 4, 4))[:, 4 - dy:36 - dy, 4 - dx:36 - dx],
                               moved) for dy in range(-4, 5) for dx in range(-4, 5))


def test_cutout_zeroes_a_square_of_half_the_side_at_most():
    x = images() + 3  # no zeros of its own
    out = diff_augment(x, ("cutout",))
    zeros = (out == 0).all(dim=1)
    assert ((out == x) | (out == 0)).all()
    assert all(0 < z.sum() <= 16 * 16 for z in zeros)


def test_color_keeps_shape_and_changes_values():
    x = images()
    out = diff_augment(x, ("color",))
    assert out.shape == x.shape and not torch.allclose(out, x)


def test_gradients_flow_through_every_transform():
    x = images().requires_grad_()
    diff_augment(x, parse_policy("color,translation,cutout")).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_transforms_are_refused():
    assert parse_policy("") == ()
    with pytest.raises(ValueError, match="unknown DiffAugment transform 'flip'"):
        parse_policy("color,flip")

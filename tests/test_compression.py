"""JPEG quality estimation from quantisation tables."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cgan_pipe.compression import STD_LUMINANCE_TABLE, estimate_jpeg_quality, scaled_table

from conftest import cifar_members


def test_quality_50_is_the_standard_table():
    assert np.array_equal(scaled_table(STD_LUMINANCE_TABLE, 50), STD_LUMINANCE_TABLE)


@pytest.mark.parametrize("quality", [1, 10, 25, 49, 50, 51, 75, 90, 95, 99])
def test_estimate_recovers_the_quality_pillow_encoded_with(quality):
    image = Image.open(io.BytesIO(next(iter(cifar_members("test", 1).values()))))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    assert estimate_jpeg_quality(Image.open(out).quantization) == quality


def test_no_table_no_estimate():
    assert estimate_jpeg_quality(None) is None
    assert estimate_jpeg_quality({}) is None
    assert estimate_jpeg_quality({0: [1, 2, 3]}) is None

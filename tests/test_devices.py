"""Device resolution: auto picks what exists, an impossible request names its key."""

from __future__ import annotations

import pytest
import torch

from cgan_pipe.devices import resolve_device
from cgan_pipe.errors import ConfigError


def test_auto_and_cpu():
    assert resolve_device("cpu", "train.device") == torch.device("cpu")
    assert resolve_device("auto", "train.device").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_names_the_key():
    with pytest.raises(ConfigError, match="loader.device: 'cuda' requested but no CUDA device"):
        resolve_device("cuda", "loader.device")

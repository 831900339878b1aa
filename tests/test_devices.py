"""Device resolution: auto picks what exists, an impossible request names its key; bf16 only where native."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cgan_pipe.devices import has_fast_bf16, resolve_device
from cgan_pipe.errors import ConfigError
from cgan_pipe.train.loop import _autocast_dtype


def test_auto_and_cpu():
    assert resolve_device("cpu", "train.device") == torch.device("cpu")
    assert resolve_device("auto", "train.device").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_names_the_key():
    with pytest.raises(ConfigError, match="loader.device: 'cuda' requested but no CUDA device"):
        resolve_device("cuda", "loader.device")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from /proc/cpuinfo (Linux)")
def test_precision_auto_is_bf16_on_a_cpu_exactly_when_it_has_native_bf16():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    cpu = torch.device("cpu")
    assert has_fast_bf16(cpu) == native
    assert _autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert _autocast_dtype("fp32", cpu) is None and _autocast_dtype("bf16", cpu) == torch.bfloat16

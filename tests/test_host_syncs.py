"""Host syncs per training step: on a GPU each one stalls the host until the queued kernels finish, so the
count is held down here, on the CPU, by counting the operations that would be syncs on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from cgan_pipe.train.loop import train

from conftest import small_config

aten = torch.ops.aten
# Operations whose result the host must wait for when their input lives on a GPU: a value read back
# (.item(), bool(), int()), a data-dependent output size (nonzero and what calls it), a checked draw.
_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
          aten.masked_select.default, aten.multinomial.default, aten._unique2.default, aten.unique_dim.default,
          aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
_COPIES_OUT = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


class HostReads(TorchDispatchMode):
    """Counts, while active and not paused, the operations that would make the host wait for a GPU: those in
    _READS, indexing by a bool mask (it calls nonzero), and copies out to the host (.tolist(), .numpy(), .cpu()).

    On the CPU every tensor counts, including scalars that a GPU run keeps on the host (a non-fused Adam's
    step counters, read once per parameter per step), so the count is an upper bound of a GPU's syncs.
    """

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False
        outer = self

        class _Copies(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in _COPIES_OUT and not outer.paused:
                    outer.count += 1
                return func(*args, **(kwargs or {}))

        self._copies = _Copies()

    def __enter__(self):
        self._copies.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._copies.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            masked = func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
            self.count += func in _READS or masked
        return func(*args, **(kwargs or {}))


@pytest.fixture
def reads(monkeypatch):
    """A HostReads counter that the training loop's data loader cannot move: the loader's own work is on the
    host in a GPU run too (DALI hands labels over as CPU bytes), and its copies to the GPU do not block."""
    import cgan_pipe.train.loop as loop

    counter, open_loader = HostReads(), loop.open_loader

    def paused_while_loading(*args, **kwargs):
        loader = open_loader(*args, **kwargs)

        class Paused:
            info, samples_per_epoch, streams = loader.info, loader.samples_per_epoch, loader.streams

            def __iter__(self):
                batches = iter(loader)
                while True:
                    counter.paused = True
                    try:
                        batch = next(batches)
                    finally:
                        counter.paused = False
                    yield batch

        return Paused()

    monkeypatch.setattr(loop, "open_loader", paused_while_loading)
    return counter


def test_the_counter_sees_what_would_stall_a_gpu():
    x = torch.arange(6.0)
    with HostReads() as reads:
        x.sum().item()
        bool(x.max() > 2)
        x[x > 2].sum()
        torch.multinomial(torch.ones(2, 3), 1)
        x.tolist()
        assert reads.count == 5
        x.add(1).mul_(2).lerp_(x, 0.5)[torch.tensor([0, 2])].sum()  # all on the device
        torch.where(x > 2, x, 0.0)
    assert reads.count == 5


def _reads_per_step(shards, tmp_path, reads, sections=None, **train_settings) -> float:
    """Host reads per training step at steady state: the difference between a 3-step and an 11-step run
    from scratch (set-up and the final tick are the same in both) over the 8 steps between."""
    counts = {}
    for steps in (3, 11):
        run_dir = tmp_path / f"run{steps}"
        cfg = small_config(run_dir, sections, steps=steps, log_every=1000, sample_every=1000, checkpoint_every=1000,
                           **train_settings)
        before = reads.count
        with reads:
            train(cfg, shards, run_dir, progress=False)
        counts[steps] = reads.count - before
    return (counts[11] - counts[3]) / 8


def test_the_default_training_step_makes_no_host_sync(small_shards, tmp_path, reads):
    assert _reads_per_step(small_shards, tmp_path, reads) == 0  # at most 1 is the target; a step makes none
    assert _reads_per_step(small_shards, tmp_path / "r1", reads, r1_gamma=1.0, r1_every=2) == 0


def test_the_jpeg_codec_of_the_compression_modes_is_the_only_reader_left(quality_shards, small_shards, tmp_path,
                                                                          reads):
    """kornia's differentiable JPEG reads 4 values per call (its qualities' min and max, and the sigma of
    its chroma anti-aliasing, which may be a host tensor on a GPU too), and a step calls it twice: condition
    mode (G's output codec, D phase and G phase) and ambient mode (the measurement of the D phase's fakes
    and the G phase's). Nothing of ours in the step reads the device."""
    condition = _reads_per_step(quality_shards, tmp_path / "c", reads, {"compression": {"mode": "condition"}})
    ambient = _reads_per_step(small_shards, tmp_path / "a", reads, {"compression": {"mode": "ambient"},
                                                                    "loader": {"jpeg_distort": [20, 30]}})
    assert condition <= 8 and ambient <= 8

"""torch.distributed for processes started by torchrun: join their group, wait for each other, average gradients."""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # torch is imported where used, so importing this module stays cheap
    import torch


# Ranks of one prepare may finish hours apart on unequal machines; a dead rank is torchrun's to
# report (it stops the others), so the wait itself is long.
WAIT_TIMEOUT = datetime.timedelta(hours=12)


def started_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun (or another torch.distributed
    launcher) started: the rendezvous variables are set and the world has more than one rank."""
    return all(name in os.environ for name in ("MASTER_ADDR", "MASTER_PORT", "RANK")) and \
        int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def ranks(backend: str = "gloo") -> Iterator[tuple[int, int]]:
    """(rank, world size) of this process for the block, the one way cgan-pipe starts distributed work:
    under torchrun (or another torch.distributed launcher) inside the launcher's process group, joined here
    and left after the block; otherwise (0, 1). gloo serves CPU work and ranks waiting for each other;
    nccl CUDA training, each rank then on GPU LOCAL_RANK."""
    if not started_by_torchrun():
        yield 0, 1
        return
    import torch
    import torch.distributed as dist  # only processes started by torchrun pay for the import

    if dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=WAIT_TIMEOUT)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """This rank's device for work on `device`: its own GPU (LOCAL_RANK, made the current one, so that nvJPEG
    and any default-device work follow it) when `device` is CUDA and torchrun started several ranks."""
    if device.type != "cuda" or not started_by_torchrun():
        return device
    import torch

    own = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(own)
    return own


def training_backend(device_setting: str) -> str:
    """The process-group backend for training on `device_setting` ('auto'/'cpu'/'cuda'): nccl for CUDA."""
    import torch

    cuda = device_setting == "cuda" or (device_setting == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def wait_for_all_ranks() -> None:
    """Block until every rank of the process group has reached this call."""
    import torch.distributed as dist

    dist.barrier()


def average_gradients(module: torch.nn.Module, world: int) -> None:
    """Average the gradients of `module`'s parameters over all ranks (one flat all-reduce), so every
    rank takes the same optimiser step. A no-op on one process."""
    import torch
    import torch.distributed as dist

    if world == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads]).div_(world)
    dist.all_reduce(flat)
    for grad, reduced in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(reduced.view_as(grad))


def broadcast_module(module: torch.nn.Module, world: int) -> None:
    """Copy rank 0's parameters and buffers into every rank's `module`."""
    import torch.distributed as dist

    if world == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def all_ranks(value: Any, world: int) -> list[Any]:
    """`value` (a picklable object) from every rank, in rank order; every rank must call. [value] on one
    process."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """Whether `flag` is true on at least one rank (every rank gets the same answer)."""
    import torch
    import torch.distributed as dist

    if world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def any_rank_on_device(flag: torch.Tensor, world: int) -> torch.Tensor:
    """`any_rank` for a bool tensor, kept on the device (no host read): true on every rank where it is
    true on at least one. A no-op on one process."""
    import torch
    import torch.distributed as dist

    if world == 1:
        return flag
    value = flag.to(torch.float32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value > 0


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of its torch.distributed group ((0, 1) without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

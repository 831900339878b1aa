"""torch.distributed for processes started by torchrun: join their group, wait for each other."""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator

from .errors import ConfigError

# Ranks of one prepare may finish hours apart on unequal machines; a dead rank is torchrun's to
# report (it stops the others), so the wait itself is long.
WAIT_TIMEOUT = datetime.timedelta(hours=12)


def started_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun (or another torch.distributed
    launcher) started: the rendezvous variables are set and the world has more than one rank."""
    return all(name in os.environ for name in ("MASTER_ADDR", "MASTER_PORT", "RANK")) and \
        int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Join the launcher's process group (gloo: CPU-only work, no GPU needed) for the block."""
    import torch.distributed as dist  # only processes started by torchrun pay for the import

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", timeout=WAIT_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def wait_for_all_ranks() -> None:
    """Block until every rank of the process group has reached this call."""
    import torch.distributed as dist

    dist.barrier()


def require_one_process(command: str) -> None:
    """Refuse to run `command` as one of several torchrun processes: it would run once per rank
    over the same files. (Training on many processes, with DDP, is not written yet.)"""
    if started_by_torchrun():
        raise ConfigError(
            f"`cgan-pipe {command}` runs as one process; under torchrun each of the "
            f"{os.environ['WORLD_SIZE']} ranks would repeat it over the same files. Run it without torchrun "
            f"(`torchrun ... cgan-pipe prepare` does split the shard writing across ranks)"
        )

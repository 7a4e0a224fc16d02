"""The process group, from the environment torchrun gives each process.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``init_process_group("env://")`` reads them. A process started without them is a run of one.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

# A collective that waits longer than this for a rank ends the run with an error instead of a hang.
# A rank that dies is noticed sooner: its connections close, and torchrun stops the others.
TIMEOUT_ENV = "DBX_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (or any env:// launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_distributed() -> bool:
    """Whether a process group of more than one process is up."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 in a run of one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """How many processes share each batch (1 in a run of one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its node: the GPU it drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup() -> bool:
    """Join torchrun's process group (once); False, doing nothing, in a run of one.

    The group has gloo for CPU tensors and, on a machine with CUDA, nccl for CUDA tensors
    (``cpu:gloo,cuda:nccl``), so it can be joined before the run's device is known (a resume reads
    it from the checkpoint). ``rank_device`` then gives each rank the GPU of its local rank.
    """
    if not launched_by_torchrun():
        return False
    import atexit

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
        atexit.register(teardown)
    return True


def rank_device(device: Any) -> Any:
    """This rank's device for the run's ``device``: under torchrun a CUDA device becomes
    ``cuda:LOCAL_RANK`` (one GPU per local rank; an index in the spec is ignored), and the CPU
    stays the CPU."""
    if device.type != "cuda" or not is_distributed():
        return device
    import torch

    from dbx.errors import UserError

    if local_rank() >= torch.cuda.device_count():
        raise UserError(f"local rank {local_rank()} has no GPU: this node has {torch.cuda.device_count()} "
                        f"CUDA device(s); start at most that many processes per node (--nproc-per-node)")
    device = torch.device("cuda", local_rank())
    torch.cuda.set_device(device)
    return device


def backend() -> str | None:
    """The process group's backend (``gloo``, ``nccl``), None in a run of one."""
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def teardown() -> None:
    """Leave the process group (at the end of a run, so that no rank exits while others wait)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

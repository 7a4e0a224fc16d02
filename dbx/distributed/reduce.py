"""Sums over ranks, for the few numbers a step or an epoch needs from every rank."""
from __future__ import annotations

from typing import Any


def sum_across_ranks(tensor: Any) -> Any:
    """``tensor`` summed over every rank, in place (each rank gets the total); the identity in a
    run of one. Every rank must call it, in the same order."""
    from dbx.distributed.group import is_distributed

    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def global_units(units: Any, local_samples: int, global_samples: int) -> Any:
    """What the loss of a step is divided by over the whole logical batch (every rank's share).

    ``units`` is this rank's count (``Task.units``): its samples, or its counted tokens. Samples
    are known without communication (the loader splits each global batch of ``global_samples``);
    tokens are summed over the ranks with one small all-reduce.
    """
    from dbx.distributed.group import is_distributed

    if not is_distributed():
        return units
    if isinstance(units, int) and units == local_samples:
        return global_samples
    import torch

    if isinstance(units, int):  # a CPU tensor: the group has gloo for those
        return int(sum_across_ranks(torch.tensor(units, dtype=torch.long)).item())
    return sum_across_ranks(units.clone())

"""Rank 0 speaks for the run: MLflow, checkpoints and printing happen there only."""
from __future__ import annotations

from typing import Any, Callable

from dbx.distributed.group import rank


def rank0_only(say: Callable[[str], None]) -> Callable[[str], None]:
    """``say`` on rank 0, a function that prints nothing on the other ranks."""
    if rank() == 0:
        return say
    return _silent


def _silent(_line: str) -> None:
    pass


class SilentRun:
    """What the ranks other than 0 log to: the MLflow run's id and store, and methods that do
    nothing (rank 0 logs the same numbers: they are reduced over every rank)."""

    def __init__(self, run_id: str, uri: str) -> None:
        self.run_id, self.uri = run_id, uri
        self.already_logged: set[int] = set()
        self.summary_logged: set[str] = set()

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def finish(self, status: str, **details: Any) -> None:
        pass


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object: a run id, a path); the identity in a
    run of one. Every rank must call it."""
    from dbx.distributed.group import is_distributed

    if not is_distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def topology_tags(device: Any) -> dict[str, str]:
    """The run's tags that say how it was spread: world size, backend, and each rank's device
    (gathered from every rank; every rank must call it)."""
    from dbx.distributed.group import backend, is_distributed, world_size

    if not is_distributed():
        return {"dbx.world_size": "1"}
    import socket

    import torch.distributed as dist

    mine = f"{socket.gethostname()}:{device}"
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    return {"dbx.world_size": str(world_size()), "dbx.backend": str(backend()),
            "dbx.rank_devices": ", ".join(f"{r}={d}" for r, d in enumerate(everyone))}

"""A failing rank tells rank 0 why, so that the MLflow run says which rank failed and how.

torchrun stops every process of a job when one of them exits with an error (SIGTERM, then
SIGKILL); rank 0 then closes the run. Before it exits, a failing rank writes its rank and message
under one key of the job's rendezvous store (torch.distributed's TCPStore, which every rank
reaches); rank 0 reads that key when it is stopped or when a collective fails.
"""
from __future__ import annotations

import json
from typing import Any

_KEY = "dbx/failure"


def _store() -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.distributed_c10d._get_default_store()


def report_failure(message: str) -> None:
    """Record this rank's failure for rank 0 (the first failure recorded wins)."""
    from dbx.distributed.group import rank

    store = _store()
    if store is None:
        return
    try:
        store.compare_set(_KEY, "", json.dumps({"rank": rank(), "message": message}))
    except Exception:  # noqa: BLE001 - the store may be gone with the job; the exit code still tells
        pass


def failure_elsewhere() -> dict[str, Any] | None:
    """The failure another rank recorded (``{"rank": ..., "message": ...}``), or None."""
    store = _store()
    if store is None:
        return None
    try:
        if not store.check([_KEY]):
            return None
        recorded = json.loads(store.get(_KEY).decode())
    except Exception:  # noqa: BLE001 - no store, no message: the caller says what it knows
        return None
    return recorded if recorded.get("rank") is not None else None

"""Atomic, checksummed checkpoints: a killed run loses at most the epoch in progress.

Each checkpoint is one file, ``epoch-0007.ckpt``: an 8-byte magic, the SHA-256 of the payload,
then the payload (``torch.save`` of a dict). It is written to a temporary file in the same
folder, fsynced, and renamed into place, so a reader sees either the whole file or none of it.
A file whose checksum does not match (a disk that lied, a copy cut short) is skipped with a
warning, and the previous checkpoint is used.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAGIC = b"DBXCKPT1"
PATTERN = re.compile(r"^epoch-(\d+)\.ckpt$")


class CorruptCheckpoint(Exception):
    pass


def checkpoint_path(folder: Path, epoch: int) -> Path:
    return folder / f"epoch-{epoch:04d}.ckpt"


def save_checkpoint(folder: str | os.PathLike[str], epoch: int, payload: dict[str, Any], keep_last: int) -> Path:
    """Write ``payload`` for ``epoch`` atomically, then delete all but the newest ``keep_last``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    final = checkpoint_path(folder, epoch)
    temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(MAGIC + hashlib.sha256(data).digest() + data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    _fsync_folder(folder)
    for old in list_checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint files in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of one checkpoint file; CorruptCheckpoint when it is damaged."""
    raw = path.read_bytes()
    header = len(MAGIC) + 32
    if len(raw) < header or not raw.startswith(MAGIC):
        raise CorruptCheckpoint(f"{path} is not a dbx checkpoint (or was cut short)")
    digest, data = raw[len(MAGIC):header], raw[header:]
    if hashlib.sha256(data).digest() != digest:
        raise CorruptCheckpoint(f"{path} fails its checksum")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def load_latest(folder: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads back intact, warning about each damaged one skipped."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, read_checkpoint(path)
        except (CorruptCheckpoint, EOFError, RuntimeError, OSError) as exc:
            warnings.warn(f"skipping damaged checkpoint: {exc}; falling back to the previous one", stacklevel=2)
    return None


def rng_states() -> dict[str, Any]:
    """Every random generator the run draws from, so a resumed run draws the same numbers."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def snapshot(spec: Any, parts: Any, state: Any) -> dict[str, Any]:
    """Everything needed to continue a run exactly where an epoch ended."""
    from dataclasses import asdict

    import dbx

    estimator = parts.estimator
    return {
        "format": 1,
        "dbx_version": dbx.__version__,
        "spec": spec.to_dict(),
        "state": asdict(state),
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "policy": parts.policy.state_dict(),
        "estimator": estimator.state_dict() if hasattr(estimator, "state_dict") else None,
        "train_loader": parts.train_loader.state_dict(),
        "rng": rng_states(),
    }


def restore(parts: Any, payload: dict[str, Any]) -> Any:
    """Load a snapshot into freshly built parts; return the loop's RunState to continue from."""
    from dbx.train.loop import RunState

    parts.model.load_state_dict(payload["model"])
    parts.optimizer.load_state_dict(payload["optimizer"])
    parts.policy.load_state_dict(payload["policy"])
    if payload.get("estimator") is not None and hasattr(parts.estimator, "load_state_dict"):
        parts.estimator.load_state_dict(payload["estimator"])
    parts.train_loader.load_state_dict(payload["train_loader"])
    restore_rng_states(payload["rng"])
    return RunState(**payload["state"])

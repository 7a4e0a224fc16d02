"""Atomic, checksummed checkpoints that run no code when read: a killed run loses at most the epoch in progress.

Each checkpoint is one file, ``epoch-0007.ckpt``: an 8-byte magic, the SHA-256 of the payload,
then the payload (``torch.save`` of a dict). It is written to a temporary file in the same
folder, fsynced, and renamed into place, so a reader sees either the whole file or none of it;
a write that fails (a full disk) removes its temporary file, and temporary files that a killed
process left behind are removed by the next save and by ``dbx resume``. A file whose checksum
does not match (a disk that lied, a copy cut short) is skipped with a warning, and the previous
checkpoint is used.

The SHA-256 is a checksum, not a signature: anyone can rewrite a file and its checksum. So the
payload is read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain
containers and refuses every other name a file asks for (``os.system`` included) before calling
it. What dbx stores is chosen to need nothing more: tensors (weights, optimizer state, generator
states), plain Python data (the spec, the loop's ``RunState``, Python's and numpy's random
states as ints) and the plugins' state as JSON text (``dbx.plugin_state``). A refused or foreign
payload is a ``UserError`` that says what was refused; it is never skipped silently.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
import tempfile
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dbx.errors import UserError
from dbx.plugin_state import encode_state

MAGIC = b"DBXCKPT1"
PATTERN = re.compile(r"^epoch-(\d+)\.ckpt$")
TEMPORARY = re.compile(r"^\.epoch-\d+\.ckpt\.(\d+)\.tmp$")
FORMAT = 2  # 1: plugin states and numpy's random state pickled as objects (read, never written)


class CorruptCheckpoint(Exception):
    """The file is damaged (checksum, length): skip it and use the one before."""


class UnsafeCheckpoint(UserError):
    """The payload asks to call something a dbx checkpoint never holds; nothing was called."""


class ForeignCheckpoint(UserError):
    """The file passes its checksum but does not hold what dbx writes."""


def checkpoint_path(folder: Path, epoch: int) -> Path:
    return folder / f"epoch-{epoch:04d}.ckpt"


def save_checkpoint(folder: str | os.PathLike[str], epoch: int, payload: dict[str, Any], keep_last: int) -> Path:
    """Write ``payload`` for ``epoch`` atomically, then delete all but the newest ``keep_last``.

    A write that fails leaves no temporary file behind and the earlier checkpoints untouched;
    the OSError (no space left, say) is raised for the caller to report.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    final = checkpoint_path(folder, epoch)
    temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(MAGIC + hashlib.sha256(data).digest() + data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)
    for old in list_checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)
    return final


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of writes that never finished (their process is gone)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = TEMPORARY.match(path.name)
        if match and (int(match.group(1)) == os.getpid() or not _alive(int(match.group(1)))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but belongs to someone else
        return True
    return True


def check_folder(folder: str | os.PathLike[str], what: str = "checkpoint.dir") -> None:
    """A UserError now, before any run starts, if checkpoints could not be written to ``folder``.

    The folder need not exist yet; its nearest existing ancestor must be a writable folder.
    Probing writes and removes one empty file, so nothing is left behind either way.
    """
    folder = Path(folder)
    fix = f"set {what} to a writable folder, or checkpoint: {{enabled: false}}"
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is" if existing == folder else f"cannot be created: {existing} is"
        raise UserError(f"checkpoint folder {folder} {where} a file, not a folder; {fix}")
    try:
        handle, probe = tempfile.mkstemp(prefix=".dbx-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"checkpoint folder {folder} cannot be written ({existing}: {exc.strerror or exc}); {fix}") from exc


def list_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint files in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of one checkpoint file.

    CorruptCheckpoint when it is damaged; UnsafeCheckpoint (naming what was refused) when its
    payload asks for anything but tensors and plain data; ForeignCheckpoint when it passes its
    checksum but torch cannot read it.
    """
    raw = path.read_bytes()
    header = len(MAGIC) + 32
    if len(raw) < header or not raw.startswith(MAGIC):
        raise CorruptCheckpoint(f"{path} is not a dbx checkpoint (or was cut short)")
    digest, data = raw[len(MAGIC):header], raw[header:]
    if hashlib.sha256(data).digest() != digest:
        raise CorruptCheckpoint(f"{path} fails its checksum")
    return _decode(data, str(path))


def round_trip(payload: Any) -> Any:
    """``payload`` written and read back as a checkpoint's payload is (``dbx.testing`` checks
    plugins with it); the UserError of ``read_checkpoint`` when it does not survive."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return _decode(buffer.getvalue(), "the payload")


def _decode(data: bytes, source: str) -> Any:
    try:
        with torch.serialization.safe_globals(_FORMAT_1_GLOBALS):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if refused is None:
            raise ForeignCheckpoint(f"{source} passes its checksum but cannot be read as a checkpoint "
                                    f"({_first_line(exc)}); delete it to resume from the one before") from None
        raise UnsafeCheckpoint(
            f"refused to load {source}: its payload asks to call {refused.group(1)}, which a dbx checkpoint never "
            f"holds (only tensors and plain data); nothing from it was run. The file was not written by dbx, or "
            f"was altered after: delete it (dbx resume then uses the checkpoint before it) or restore a trusted "
            f"copy") from None
    except (RuntimeError, ValueError, EOFError) as exc:
        raise ForeignCheckpoint(f"{source} passes its checksum but cannot be read as a checkpoint "
                                f"({_first_line(exc)}); delete it to resume from the one before") from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _format_1_globals() -> list[Any]:
    """What format-1 files need beyond torch's defaults: numpy's uint32 random-state array, built
    by checked stand-ins (``dbx.safe_pickle``) that make nothing but a plain uint32 ndarray."""
    from dbx.safe_pickle import numpy_array_globals

    names = numpy_array_globals([np.uint32])
    return [(function, name) for name, function in names.items()] + [type(np.dtype(np.uint32))]


_FORMAT_1_GLOBALS = _format_1_globals()


def load_latest(folder: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads back intact, warning about each damaged one skipped.

    An unsafe or foreign file is not skipped: its ``UserError`` stops the resume.
    """
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, read_checkpoint(path)
        except (CorruptCheckpoint, OSError) as exc:
            warnings.warn(f"skipping damaged checkpoint: {exc}; falling back to the previous one", stacklevel=2)
    return None


def rng_states() -> dict[str, Any]:
    """Every random generator the run draws from, so a resumed run draws the same numbers.

    Python's and numpy's states are stored as ints (not numpy arrays), so reading them back
    needs nothing beyond plain data.
    """
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}
    states = {"python": [version, list(internal), gauss], "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = states["numpy"]
    if isinstance(numpy_state, dict):  # format 2; format 1 kept numpy's own tuple
        numpy_state = {**numpy_state, "state": {**numpy_state["state"],
                                                "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}}
    np.random.set_state(numpy_state)
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
    """Everything needed to continue a run exactly where an epoch ended.

    ``decision`` is what ``dbx.train.drift`` recorded of the policy's last call (the state it
    decided from, its inputs and its answer), so ``dbx resume`` can replay it.
    """
    import dbx

    estimator, policy = parts.estimator, parts.policy
    decision = getattr(policy, "last_decision", None)
    return {
        "format": FORMAT,
        "dbx_version": dbx.__version__,
        "spec": spec.to_dict(),
        "state": asdict(state),
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "policy": encode_state(policy.state_dict(), owner=f"policy {spec.policy.name!r}"),
        "estimator": (encode_state(estimator.state_dict(), owner=f"estimator {spec.estimator.name!r}")
                      if hasattr(estimator, "state_dict") else None),
        "decision": None if decision is None else encode_state(decision),
        "train_loader": parts.train_loader.state_dict(),
        "rng": rng_states(),
    }


_PAYLOAD_TYPES = {"spec": dict, "state": dict, "model": dict, "optimizer": dict, "train_loader": dict, "rng": dict}


def payload_problems(payload: Any) -> list[str]:
    """What keeps ``payload`` from being a checkpoint this dbx can resume (empty when it is one)."""
    from dbx.train.loop import RunState

    if not isinstance(payload, dict):
        return [f"it holds a {type(payload).__name__}, not the dict dbx writes"]
    problems = []
    version = payload.get("format")
    if version not in (1, FORMAT):
        problems.append(f"its format is {version!r}; this dbx reads formats 1 and {FORMAT}")
    for key, kind in _PAYLOAD_TYPES.items():
        if key not in payload:
            problems.append(f"it has no {key!r}")
        elif not isinstance(payload[key], kind):
            problems.append(f"its {key!r} is a {type(payload[key]).__name__}, not a {kind.__name__}")
    plugin_state = (str, dict) if version == 1 else (str,)
    for key in ("policy", "estimator"):
        if key not in payload:
            problems.append(f"it has no {key!r}")
        elif not isinstance(payload[key], plugin_state) and not (key == "estimator" and payload[key] is None):
            problems.append(f"its {key!r} is a {type(payload[key]).__name__}, not the plugin's state")
    state = payload.get("state")
    if isinstance(state, dict):
        known = {f.name for f in fields(RunState)}
        unknown, missing = sorted(set(state) - known), sorted({"epoch", "batch_size"} - set(state))
        if unknown:
            problems.append(f"its run state has keys this dbx does not know: {', '.join(unknown)}")
        if missing:
            problems.append(f"its run state lacks {', '.join(missing)}")
    rng = payload.get("rng")
    if isinstance(rng, dict):
        missing = sorted({"python", "numpy", "torch"} - set(rng))
        if missing:
            problems.append(f"its random-generator states lack {', '.join(missing)}")
    return problems


def check_payload(path: Path, payload: Any) -> dict[str, Any]:
    """``payload`` if it can be resumed, else a ForeignCheckpoint listing what is wrong with it."""
    problems = payload_problems(payload)
    if problems:
        raise ForeignCheckpoint(f"{path} passes its checksum but is not a checkpoint this dbx can resume: "
                                f"{'; '.join(problems)}. Delete it to resume from the checkpoint before it, or "
                                f"start the run again with dbx run")
    return payload


def restore(parts: Any, payload: dict[str, Any]) -> Any:
    """Load a snapshot into freshly built parts; return the loop's RunState to continue from."""
    from dbx.plugin_state import decode_state
    from dbx.train.loop import RunState

    def plugin_state(value: Any) -> Any:
        return decode_state(value) if isinstance(value, str) else value  # format 1 kept the dict itself

    parts.model.load_state_dict(payload["model"])
    parts.optimizer.load_state_dict(payload["optimizer"])
    parts.policy.load_state_dict(plugin_state(payload["policy"]))
    if payload.get("estimator") is not None and hasattr(parts.estimator, "load_state_dict"):
        parts.estimator.load_state_dict(plugin_state(payload["estimator"]))
    parts.train_loader.load_state_dict(payload["train_loader"])
    restore_rng_states(payload["rng"])
    return RunState(**payload["state"])

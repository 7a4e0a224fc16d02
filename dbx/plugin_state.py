"""How a plugin's ``state_dict()`` is kept in a checkpoint: as JSON text.

A policy's or estimator's state is plain Python data (the contract in ``dbx.protocols``), so it
is stored as JSON rather than pickled: reading it back can run no code, and ``dbx.testing``
checks a plugin against exactly this round trip. Tuples come back as lists, and NaN and
infinities survive (Python's JSON writes them as ``NaN`` and ``Infinity``). Keys are sorted, so
two equal states have the same text and can be compared as text.

Torch-free on purpose: ``dbx.testing.check_policy`` uses it without importing torch.
"""
from __future__ import annotations

import json
from typing import Any

__all__ = ["encode_state", "decode_state", "state_differences"]


def encode_state(state: Any, *, owner: str = "the plugin") -> str:
    """``state`` as canonical JSON text; a TypeError naming ``owner`` when it is not plain data."""
    try:
        return json.dumps(state, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{owner}'s state_dict() is not plain data that a checkpoint can hold ({exc}); "
                        f"return only dicts with str keys, lists, str, int, float, bool and None "
                        f"(dbx.testing checks this)") from exc


def decode_state(text: str) -> Any:
    """The state that ``encode_state`` wrote."""
    return json.loads(text)


def state_differences(saved: str, now: str, limit: int = 3) -> str:
    """A short description of how two encoded states differ, for a warning."""
    old, new = decode_state(saved), decode_state(now)
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        parts = [f"{k}: saved {old.get(k, '(absent)')!r}, now {new.get(k, '(absent)')!r}"
                 for k in keys if old.get(k, ...) != new.get(k, ...)]
        more = f" (and {len(parts) - limit} more)" if len(parts) > limit else ""
        return "; ".join(parts[:limit]) + more
    return f"saved {_short(saved)}, now {_short(now)}"


def _short(text: str, width: int = 80) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."

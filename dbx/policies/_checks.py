"""Argument checks shared by the built-in policies (private: not part of the plugin API)."""
from __future__ import annotations


def positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def at_least(name: str, value: int, floor_name: str, floor: int) -> int:
    if value < floor:
        raise ValueError(f"{name} ({value}) must be at least {floor_name} ({floor})")
    return value

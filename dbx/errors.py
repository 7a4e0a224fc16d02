"""The two kinds of failure dbx distinguishes, because they map to exit codes.

A ``UserError`` means the input is wrong (spec, CLI, plugin name, missing data): exit 2, nothing
started. A ``RunFailed`` means a run that started could not finish (diverged, crashed): exit 1,
the MLflow run is marked FAILED with the reason.
"""
from __future__ import annotations


class UserError(Exception):
    """Wrong input. The message says what is wrong, where, and how to fix it."""

    exit_code = 2


class RunFailed(Exception):
    """A started run could not finish. ``reason`` is a short machine-readable tag value."""

    exit_code = 1

    def __init__(self, message: str, *, reason: str = "error", epoch: int | None = None,
                 step: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.epoch = epoch
        self.step = step

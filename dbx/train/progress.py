"""A progress bar within each epoch, shown only on a terminal (logs and CI get plain lines)."""
from __future__ import annotations

import sys
from typing import Any


class EpochProgress:
    """``with EpochProgress("epoch 3/20", total=steps) as p: ... p.advance()``.

    On a terminal this draws a rich progress bar that disappears when the epoch ends (the loop
    then prints one line per epoch); elsewhere ``advance`` does nothing at all.
    """

    def __init__(self, description: str, total: int, *, enabled: bool | None = None) -> None:
        self.description = description
        self.total = total
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress: Any = None
        self._task: Any = None
        self._pending = 0
        self._stride = max(1, total // 100)

    def __enter__(self) -> "EpochProgress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def advance(self) -> None:
        """One step done. The bar is redrawn every ``stride`` steps (about 100 times an epoch),
        so that a terminal costs small batches no Python work per step beyond a counter."""
        if self._progress is None:
            return
        self._pending += 1
        if self._pending >= self._stride:
            self._progress.advance(self._task, self._pending)
            self._pending = 0

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

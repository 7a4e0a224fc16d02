"""Count the operations a piece of code dispatches: what a GPU step launches, measured on any device.

On a GPU a small training step is bound by host time: every dispatched operation costs a few
microseconds of Python and dispatcher work and, unless it is a view, a kernel launch. The number
of operations is therefore the measure of a measuring step's overhead that needs no GPU, and,
unlike a time, is exact and repeatable (``benchmarks/estimators.py --ops`` and
``tests/test_estimator_ops.py`` use it)::

    with OpCounter() as ops:
        train_step()
    ops.total, ops.by_name.most_common(5)

Every operation that reaches the dispatcher is counted once, views (``view``, ``slice``,
``transpose``, ...) included: they cost host time too, though no launch. ``label(name)`` files the
operations dispatched inside it under ``name`` in ``by_label`` (nested labels: the innermost).
"""
from __future__ import annotations

import collections
import contextlib
from typing import Any, Iterator

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter"]


class OpCounter(TorchDispatchMode):
    """A dispatch mode that counts operations: in all, by operator name and by label."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_name: collections.Counter[str] = collections.Counter()
        self.by_label: collections.Counter[str] = collections.Counter()
        self._labels: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.total += 1
        self.by_name[str(func.overloadpacket)] += 1
        if self._labels:
            self.by_label[self._labels[-1]] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def label(self, name: str) -> Iterator[None]:
        """File the operations dispatched in the block under ``name``."""
        self._labels.append(name)
        try:
            yield
        finally:
            self._labels.pop()

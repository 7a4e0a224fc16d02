"""AdaBatch (Devarakonda, Naumov and Garland, 2017): grow the batch on a fixed schedule.

Every ``every`` epochs, B <- min(B * factor, max). The DiveBatch authors ran it with factor 2,
every 20 epochs, max 2048 and no learning-rate decay (``lr_decay: 1.0``); the original paper
also multiplies the learning rate by 0.75 at each increase (``lr_decay: 0.75``). The spec's
``lr_scaling`` rule applies on top, like for every policy.
"""
from __future__ import annotations

from typing import Any

from dbx.policies._checks import at_least, positive_int
from dbx.protocols import DiversityEstimate, EpochState


class AdaBatch:
    uses_diversity = False

    def __init__(self, *, initial: int = 128, max: int = 2048, every: int = 20, factor: int = 2,
                 lr_decay: float = 1.0) -> None:
        self.initial = positive_int("initial", initial)
        self.max = at_least("max", positive_int("max", max), "initial", initial)
        self.every = positive_int("every", every)
        self.factor = at_least("factor", positive_int("factor", factor), "1", 1)
        if not lr_decay > 0:
            raise ValueError(f"lr_decay must be > 0, got {lr_decay!r}")
        self.lr_decay = float(lr_decay)

    def initial_batch_size(self) -> int:
        return self.initial

    def measures_in(self, epoch: int) -> bool:
        return False

    def next_batch_size(self, state: EpochState, diversity: DiversityEstimate | None) -> int:
        if state.epoch % self.every != 0:
            return state.batch_size
        return min(state.batch_size * self.factor, self.max)

    def lr_factor(self, old: int, new: int) -> float:
        """The original AdaBatch's extra learning-rate decay at each increase."""
        return self.lr_decay if new != old else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

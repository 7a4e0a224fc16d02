"""DiveBatch (Chen, Wang and Sundaram, arXiv 2509.16173): grow the batch with gradient diversity.

Gradient diversity over the n training samples of one epoch is

    diversity = sum_i ||g_i||^2 / ||sum_i g_i||^2        (Yin et al., AISTATS 2018)

and n * diversity = 1 + B_simple, the gradient noise scale of McCandlish et al. (2018): a large
diversity means gradients disagree, so a larger batch still makes progress per sample.

The rule, as in the authors' code: every ``resize_every`` epochs, while B < ``max``, the epoch
that ends at the resize point is measured (the estimator watches its ordinary training steps),
and then

    B_next = int(min(max(delta * n * diversity, B), max))

so B never decreases and never exceeds ``max``. A NaN or infinite diversity (the summed gradient
vanished) jumps to ``max``. The learning-rate "rescale" variant is the spec's
``lr_scaling: linear``, applied by the training loop.
"""
from __future__ import annotations

import math
from typing import Any

from dbx.policies._checks import at_least, positive_int
from dbx.protocols import DiversityEstimate, EpochState


class DiveBatch:
    uses_diversity = True

    def __init__(self, *, dataset_size: int, initial: int = 128, max: int = 2048,
                 delta: float = 0.1, resize_every: int = 20) -> None:
        self.dataset_size = positive_int("dataset_size", dataset_size)
        self.initial = positive_int("initial", initial)
        self.max = at_least("max", positive_int("max", max), "initial", initial)
        if not (isinstance(delta, (int, float)) and delta > 0 and math.isfinite(delta)):
            raise ValueError(f"delta must be a finite number > 0, got {delta!r}")
        self.delta = float(delta)
        self.resize_every = positive_int("resize_every", resize_every)
        self.batch_size = self.initial

    def initial_batch_size(self) -> int:
        return self.initial

    def measures_in(self, epoch: int) -> bool:
        """Measure only the epoch that ends at a resize point, and only while B can still grow."""
        return epoch % self.resize_every == 0 and self.batch_size < self.max

    def next_batch_size(self, state: EpochState, diversity: DiversityEstimate | None) -> int:
        self.batch_size = state.batch_size
        if state.epoch % self.resize_every != 0 or state.batch_size >= self.max or diversity is None:
            return state.batch_size
        value = diversity.value
        if not math.isfinite(value):
            proposed = float(self.max)
        else:
            proposed = self.delta * self.dataset_size * value
        self.batch_size = int(min(max(proposed, state.batch_size), self.max))
        return self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_size = int(state["batch_size"])

"""Plain SGD: the same batch size in every epoch."""
from __future__ import annotations

from typing import Any

from dbx.policies._checks import positive_int
from dbx.protocols import DiversityEstimate, EpochState


class FixedBatch:
    """Keep ``batch_size`` for the whole run (the small- and large-batch SGD baselines)."""

    uses_diversity = False

    def __init__(self, *, batch_size: int = 128) -> None:
        self.batch_size = positive_int("batch_size", batch_size)

    def initial_batch_size(self) -> int:
        return self.batch_size

    def measures_in(self, epoch: int) -> bool:
        return False

    def next_batch_size(self, state: EpochState, diversity: DiversityEstimate | None) -> int:
        return self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

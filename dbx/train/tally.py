"""An epoch's running numbers, kept on the device and read once, when the epoch ends.

The step must not wait for the device, and on small batches (logistic regression at B = 32 takes
tens of microseconds a step) every extra operation per step shows in the throughput. So the
tally does no arithmetic per step at all: it keeps each step's loss (a 0-d tensor), its
predicted classes (one ``argmax``: the only per-step work that train accuracy costs) with the
targets they are compared with, and the gradient norm when clipping, in Python lists. At the end
of the epoch it stacks them, sums them in float64, finds the first step whose loss was not
finite, counts the correct predictions, and reads everything back in one transfer. Under torchrun
the losses and correct counts are this rank's and are summed over the ranks then (one all-reduce);
the units and samples passed to ``add`` are the global batch's already.

Memory: one 0-d tensor per step and one integer prediction per sample (per token for sequence
tasks) until the epoch ends, far less than the data the epoch has gone through.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dbx.distributed import sum_across_ranks
from dbx.train.tasks import Task

__all__ = ["EpochTally", "TrainedEpoch"]


@dataclass
class TrainedEpoch:
    """What one pass over the training data reports (``dbx.train.loop.train_one_epoch``)."""

    loss: float  # mean per sample (per counted token for sequence tasks)
    accuracy: float | None  # None for regression; token accuracy for sequence tasks
    samples: int
    steps: int  # optimizer steps, skipped ones included
    skipped: int = 0  # steps skipped for a non-finite loss
    first_bad: int = -1  # the first step (0-based) whose loss was not finite, -1 for none
    grad_norm: float | None = None  # mean global gradient norm before clipping (only when clipping)


class EpochTally:
    """``tally.add(...)`` after each step that updated the weights, ``tally.finish(...)`` once."""

    def __init__(self, task: Task, device: torch.device) -> None:
        self.task = task
        self.device = device
        self.losses: list[torch.Tensor] = []  # one per step taken, so index = step (without skipping)
        self.predictions: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.units: int = 0  # samples or tokens, when counted on the host
        self.device_units: list[torch.Tensor] = []  # tokens counted on the device (ignore_index)
        self.samples = 0

    def add(self, loss: torch.Tensor, units: int | torch.Tensor, samples: int,
            predictions: list[torch.Tensor], targets: list[torch.Tensor], norm: torch.Tensor | None) -> None:
        """One step's numbers: its summed loss, what it is divided by, its predictions and targets
        (one pair per micro-batch), and its gradient norm (None without clipping)."""
        self.losses.append(loss)
        if isinstance(units, int):
            self.units += units
        else:
            self.device_units.append(units)
        self.samples += samples
        self.predictions += predictions
        self.targets += targets
        if norm is not None:
            self.norms.append(norm)

    def finish(self, steps: int, skipped: int, clipped: bool) -> TrainedEpoch:
        """The epoch's means, read from the device in one transfer (the epoch's one sync)."""
        device, task = self.device, self.task
        zero = torch.zeros((), dtype=torch.float64, device=device)
        losses = torch.stack(self.losses).double() if self.losses else zero.unsqueeze(0)
        not_finite = ~torch.isfinite(losses)
        first_bad = torch.where(not_finite.any(), not_finite.int().argmax(), -1).double()
        if task.has_accuracy and self.predictions:
            correct = task.correct_predictions(torch.cat(self.predictions), torch.cat(self.targets)).double()
        else:
            correct = zero
        units = zero + self.units
        if self.device_units:
            units = units + torch.stack(self.device_units).sum()
        norm = torch.stack(self.norms).double().sum() if self.norms else zero
        shared = sum_across_ranks(torch.stack([losses.sum(), correct]))  # under torchrun: every rank's share
        totals = torch.stack([shared[0], shared[1], norm, units, first_bad])
        total_loss, total_correct, total_norm, total_units, bad = totals.tolist()
        total_units = max(total_units, 1.0)
        return TrainedEpoch(
            loss=total_loss / total_units, accuracy=total_correct / total_units if task.has_accuracy else None,
            samples=self.samples, steps=steps, skipped=skipped, first_bad=int(bad),
            grad_norm=total_norm / max(steps - skipped, 1) if clipped else None)

"""What the kind of task means for training: the loss of a batch, its normalisation, its metrics.

Three tasks, told by the data (``DataSplits.task``, else inferred from its targets):

- ``classification``: outputs ``(B, C)``, targets ``(B,)`` class indices. Metrics: loss, accuracy.
- ``regression``: outputs and float targets of one shape (``num_classes`` None). Metric: loss.
- ``sequence``: outputs ``(B, T, V)``, targets ``(B, T)`` token indices (language modelling,
  token classification), where a target equal to the loss's ``ignore_index`` counts for nothing.
  Metrics: the loss per token, token accuracy, and perplexity ``exp(mean token cross-entropy)``.

How a step's loss is normalised, and why the estimators stay exact. Every loss is first a sum of
per-sample losses, ``sum_i loss_i``; the step back-propagates ``loss_scale * sum_i loss_i`` and
hands the same ``loss_scale`` to the estimator (``dbx.protocols.DiversityEstimator``), which
divides it out. For classification and regression ``loss_scale = 1 / B``: the mean over the
logical batch. For sequences the per-sample loss is the sum over that sequence's counted tokens,
so gradient diversity is measured per sequence (a sample is a sequence, and ``B`` and DiveBatch's
``n`` count sequences), and ``loss_scale = 1 / N`` with N the counted tokens of the logical batch:
the step's loss is the mean token loss, the usual language-model objective, whatever the
micro-batching. When the targets can hold ``ignore_index`` N is counted on the device (a 0-d
tensor, so no step waits for it); when the training and test targets are tensors without it
(``text_file`` data) N is ``B * T``, a plain number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dbx import registry
from dbx.errors import UserError
from dbx.protocols import DataSplits
from dbx.train.losses import CrossEntropy

__all__ = ["Task", "TASKS", "build_task", "infer_task"]

TASKS = ("classification", "regression", "sequence")
DEFAULT_LOSS = {"classification": "cross_entropy", "sequence": "cross_entropy", "regression": "mse"}


@dataclass(frozen=True)
class Task:
    """The task of a run and its loss. ``loss_fn`` is the run's loss as estimators call it."""

    kind: str
    loss: Callable[..., torch.Tensor]
    ignore_index: int | None = None  # sequence tasks: targets that count for nothing
    count_on_device: bool = False  # sequence tasks whose targets may hold ignore_index

    @property
    def has_accuracy(self) -> bool:
        return self.kind != "regression"

    @property
    def plain_cross_entropy(self) -> bool:
        """True when the loss is the cross-entropy itself, so its mean is the log-perplexity."""
        return isinstance(self.loss, CrossEntropy) and self.loss.label_smoothing == 0.0

    def loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """The loss of a batch: ``"sum"`` over samples (dbx's one use), ``"none"`` per sample, or
        ``"mean"`` over samples (over counted tokens for sequences)."""
        if self.kind != "sequence":
            return self.loss(outputs, targets, reduction=reduction)
        flat_outputs, flat_targets = outputs.flatten(0, -2), targets.flatten()
        if reduction == "none":  # one loss per sequence: the sum over its tokens
            return self.loss(flat_outputs, flat_targets, reduction="none").view(targets.shape).sum(dim=1)
        total = self.loss(flat_outputs, flat_targets, reduction="sum")
        return total / self.units(targets) if reduction == "mean" else total

    def units(self, targets: torch.Tensor) -> int | torch.Tensor:
        """What a batch's summed loss is divided by: its samples, or its counted tokens."""
        if self.kind != "sequence":
            return targets.shape[0]
        if self.count_on_device:
            return (targets != self.ignore_index).sum().clamp_min(1)
        return targets.numel()

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Correct predictions in a batch (a device tensor), None for regression."""
        predicted = self.predictions(outputs)
        return None if predicted is None else self.correct_predictions(predicted, targets)

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor | None:
        """The predicted class of each sample (each token for sequences), None for regression.
        Training keeps these and counts the correct ones once per epoch (``dbx.train.tally``)."""
        if self.kind == "classification":
            return outputs.argmax(dim=1)
        if self.kind == "sequence":
            return outputs.argmax(dim=-1)
        return None

    def correct_predictions(self, predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """How many of ``predicted`` (from ``predictions``) equal ``targets``, ignored tokens not counted."""
        hits = predicted == targets
        if self.kind == "sequence" and self.count_on_device:
            hits &= targets != self.ignore_index
        return hits.sum()

    def nll_sum(self, outputs: torch.Tensor, targets: torch.Tensor, loss_sum: torch.Tensor) -> torch.Tensor | None:
        """Summed token cross-entropy, for perplexity (sequence tasks only; ``loss_sum`` reused
        when the loss is that cross-entropy already)."""
        if self.kind != "sequence":
            return None
        if self.plain_cross_entropy:
            return loss_sum
        ignore = self.ignore_index if self.ignore_index is not None else -100
        return F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), ignore_index=ignore, reduction="sum")

    def metrics(self, split: str, loss: float, accuracy: float | None, nll: float | None = None) -> dict[str, float]:
        """The epoch's numbers for ``split`` ("train" or "test"), named as MLflow shows them.

        For sequences ``{split}_loss`` is the mean per token and ``{split}_accuracy`` the token
        accuracy; ``{split}_perplexity`` is ``exp`` of the mean token cross-entropy (``nll``;
        for training, where no separate cross-entropy is computed, only when the loss is it).
        """
        out = {f"{split}_loss": loss}
        if accuracy is not None:
            out[f"{split}_accuracy"] = accuracy
        if self.kind == "sequence":
            if nll is None and self.plain_cross_entropy:
                nll = loss
            if nll is not None:
                out[f"{split}_perplexity"] = perplexity(nll)
        return out


def perplexity(mean_nll: float) -> float:
    """``exp(mean token cross-entropy)``; infinite rather than an overflow for a diverged model."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def infer_task(data: DataSplits) -> str:
    """The data's task: as it declares, else regression without classes, sequence for 2-d
    integer targets ``(N, T)``, classification otherwise."""
    declared = getattr(data, "task", None)
    if declared is not None:
        if declared not in TASKS:
            raise UserError(f"the dataset declares task {declared!r}; a task is one of {', '.join(TASKS)}")
        return declared
    if data.num_classes is None:
        return "regression"
    targets = _first_targets(data.train)
    return "sequence" if targets is not None and targets.dim() >= 1 else "classification"


def build_task(loss_spec: Any, data: DataSplits) -> Task:
    """The task the data implies, with the spec's loss (or the task's default loss)."""
    kind = infer_task(data)
    name = loss_spec.name or DEFAULT_LOSS[kind]
    loss = registry.build("loss", name, loss_spec.params)
    fits = getattr(loss, "tasks", None)
    if fits is not None and kind not in fits:
        raise UserError(f"loss {name!r} is made for {', '.join(fits)} tasks, but {data.description or 'the data'} "
                        f"is a {kind} task; choose another loss (or leave loss.name null for "
                        f"{DEFAULT_LOSS[kind]!r})")
    if kind != "sequence":
        return Task(kind, loss)
    ignore_index = getattr(loss, "ignore_index", None)
    on_device = ignore_index is not None and any(_may_hold(split, ignore_index) for split in (data.train, data.test))
    return Task(kind, loss, ignore_index, on_device)


def _first_targets(split: Any) -> torch.Tensor | None:
    """The targets of the first sample of a split, as a tensor."""
    if isinstance(split, (tuple, list)) and len(split) == 2 and isinstance(split[1], torch.Tensor):
        return split[1][0]
    try:
        return torch.as_tensor(split[0][1])
    except Exception:  # noqa: BLE001 - an odd split; the loader reports it properly
        return None


def _may_hold(split: Any, value: int) -> bool:
    """Whether a split's targets may equal ``value``: checked once for tensors, assumed otherwise."""
    if isinstance(split, (tuple, list)) and len(split) == 2 and isinstance(split[1], torch.Tensor):
        return bool((split[1] == value).any())
    return True

"""The built-in training losses (entry-point group ``dbx.losses``): cross-entropy, MSE, Huber.

A loss plugin is a factory whose keyword-only parameters are its schema (``loss.params`` in a
spec) and which returns a callable ``loss(outputs, targets, reduction="sum")`` with torch's
functional-loss conventions: ``outputs`` ``(N, C)`` logits and ``targets`` ``(N,)`` class
indices, or ``outputs`` and ``targets`` of one shape for regression. dbx itself only asks for
``reduction="sum"``: the sum of the per-sample losses, which the training loop divides by the
logical batch's size (or its token count) and the estimators differentiate per sample. For
sequence tasks dbx flattens ``(B, T, V)`` outputs and ``(B, T)`` targets to ``(B*T, V)`` and
``(B*T,)`` before calling the loss, so a loss never needs to know about sequences.

Optional attributes a loss may carry, read by dbx:

- ``ignore_index`` (int): targets equal to it contribute nothing; dbx leaves them out of the
  token counts of sequence tasks (the loss's mean, the token accuracy).
- ``tasks`` (tuple of "classification", "regression", "sequence"): the tasks it makes sense for;
  naming it for another task is an input error before the run starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

__all__ = ["cross_entropy", "mse", "huber", "CrossEntropy", "MeanSquaredError", "Huber"]


@dataclass(frozen=True)
class CrossEntropy:
    """``F.cross_entropy`` with label smoothing and an ignore index."""

    label_smoothing: float = 0.0
    ignore_index: int = -100
    tasks: ClassVar[tuple[str, ...]] = ("classification", "sequence")

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction=reduction, ignore_index=self.ignore_index,
                               label_smoothing=self.label_smoothing)


@dataclass(frozen=True)
class MeanSquaredError:
    """``F.mse_loss``: the squared error, without a factor of one half."""

    tasks: ClassVar[tuple[str, ...]] = ("regression",)

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.mse_loss(outputs, targets, reduction=reduction)


@dataclass(frozen=True)
class Huber:
    """``F.huber_loss``: squared below ``delta``, linear above it (robust to outlying targets)."""

    delta: float = 1.0
    tasks: ClassVar[tuple[str, ...]] = ("regression",)

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.huber_loss(outputs, targets, reduction=reduction, delta=self.delta)


def cross_entropy(*, label_smoothing: float = 0.0, ignore_index: int = -100) -> CrossEntropy:
    """Cross-entropy over class logits (classification) or token logits (sequence tasks).

    ``label_smoothing`` in [0, 1) mixes the one-hot target with the uniform distribution
    (Szegedy et al. 2016); ``ignore_index`` marks targets that count for nothing (padding).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return CrossEntropy(label_smoothing=float(label_smoothing), ignore_index=int(ignore_index))


def mse() -> MeanSquaredError:
    """Mean squared error, dbx's loss for regression data."""
    return MeanSquaredError()


def huber(*, delta: float = 1.0) -> Huber:
    """Huber loss with threshold ``delta`` > 0 (``smooth_l1`` scaled by ``delta``)."""
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    return Huber(delta=float(delta))

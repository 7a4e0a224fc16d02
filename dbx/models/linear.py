"""Logistic (or, for regression, linear) regression: flatten the input, one Linear layer."""
from __future__ import annotations

import math

from torch import nn

__all__ = ["logreg", "num_outputs"]


def num_outputs(num_classes: int | None) -> int:
    """Width of the last layer: one logit per class, or one output for regression."""
    return 1 if num_classes is None else int(num_classes)


def logreg(*, num_classes: int | None, input_shape: tuple[int, ...], bias: bool = True) -> nn.Module:
    """``Flatten -> Linear(prod(input_shape), num_classes)``, trained with cross-entropy by dbx.

    With two classes this is binary logistic regression written as a two-logit softmax (the same
    model, over-parametrised by one weight vector). For regression (``num_classes=None``) it is
    ordinary least squares.
    """
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs(num_classes), bias=bias))

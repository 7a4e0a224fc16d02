"""A fully connected network: flatten, then Linear + activation (+ dropout) per hidden layer."""
from __future__ import annotations

import math
from typing import Literal

from torch import nn

from dbx.models.linear import num_outputs

__all__ = ["mlp", "ACTIVATIONS"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}

Activation = Literal["relu", "gelu", "silu", "tanh", "sigmoid", "elu", "leaky_relu"]


def mlp(
    *,
    num_classes: int | None,
    input_shape: tuple[int, ...],
    widths: list[int] = [256, 256],  # noqa: B006 - never mutated; a list so YAML lists validate
    activation: Activation = "relu",
    dropout: float = 0.0,
) -> nn.Module:
    """``Flatten -> [Linear(w) -> activation (-> Dropout)] for w in widths -> Linear(num_classes)``.

    ``widths: []`` gives logistic regression. Only Linear layers carry parameters (activations and
    dropout are parameter-free), so every diversity estimator supports it.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if any(int(w) < 1 for w in widths):
        raise ValueError(f"widths must be positive integers, got {list(widths)}")
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for width in widths:
        layers += [nn.Linear(fan_in, int(width)), ACTIVATIONS[activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        fan_in = int(width)
    layers.append(nn.Linear(fan_in, num_outputs(num_classes)))
    return nn.Sequential(*layers)

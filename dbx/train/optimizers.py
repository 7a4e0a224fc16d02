"""dbx's ``sgd``: torch.optim.SGD with momentum 0.9 unless told otherwise.

Every other built-in optimizer is a torch.optim class registered as it is (setup.cfg,
``dbx.optimizers``). SGD alone gets a factory, because a dbx spec has always meant momentum 0.9
when it left momentum out (``optimizer: {lr: 0.1}``), where torch's default is 0: the default
lives here, in the signature that ``dbx validate`` and ``docs/spec.md`` read, and the optimizer
built is torch's own ``SGD``.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["sgd"]


def sgd(params: Any, lr: float = 1e-3, momentum: float = 0.9, dampening: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False, *, maximize: bool = False, foreach: bool | None = None,
        differentiable: bool = False, fused: bool | None = None) -> torch.optim.SGD:
    """Stochastic gradient descent with (by default) momentum 0.9: ``torch.optim.SGD``."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                           nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                           fused=fused)

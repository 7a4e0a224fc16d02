"""Batch-size policies outside ``dbx run``: ``build_policy`` and ``AdaptiveBatchSize``. **Public API**.

``dbx run`` builds its policy from the spec's ``policy: {name, params}`` through the plugin
registry; ``build_policy(name, params, dataset_size=n)`` builds the very same object (a built-in
or any installed plugin, its params checked against the factory's signature as ``dbx validate``
checks a spec). ``AdaptiveBatchSize`` drives it as ``dbx run``'s loop does: which epochs to
measure, the next batch size after each epoch, and the spec's ``lr_scaling`` rule (times the
policy's own ``lr_factor``, if it has one) whenever the batch size changes::

    adaptive = dbx.AdaptiveBatchSize("divebatch", {"initial": 32, "max": 1024, "delta": 0.1, "resize_every": 1},
                                     dataset_size=len(train_set), lr_scaling="linear")
    for epoch in range(1, epochs + 1):
        loader = DataLoader(train_set, batch_size=adaptive.batch_size, shuffle=True)
        with meter.epoch(measure=adaptive.measures_in(epoch)):
            ...                                        # the training steps, meter.step() in each
        change = adaptive.end_epoch(epoch, meter.result)
        for group in optimizer.param_groups:
            group["lr"] *= change.lr_factor
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dbx import registry
from dbx.errors import UserError
from dbx.protocols import BatchSizePolicy, DiversityEstimate, EpochState
from dbx.train.lr import rescale_factor

__all__ = ["build_policy", "AdaptiveBatchSize", "Resize", "PolicyError"]


class PolicyError(UserError):
    """A policy that cannot be built as asked, or that answered something a batch size cannot be."""


def build_policy(name: str, params: dict[str, Any] | None = None, *, dataset_size: int,
                 seed: int = 0) -> BatchSizePolicy:
    """The policy ``name`` with ``params``, built as ``dbx run`` builds a spec's ``policy:`` section.

    ``name`` is a built-in (``fixed``, ``adabatch``, ``divebatch``) or any installed plugin
    (``dbx plugins`` lists them); ``params`` are checked against the factory's keyword signature
    (unknown names with a did-you-mean, wrong types, missing required ones) and ``dataset_size``
    (the number of training samples) and ``seed`` are passed when the factory takes them.
    """
    params = dict(params or {})
    problems = registry.check_params("policy", name, params)
    if problems:
        raise PolicyError(f"policy {name!r}: " + "; ".join(f"params.{'.'.join(path)}: {message}"
                                                          for path, message in problems))
    return registry.build("policy", name, params, dataset_size=dataset_size, seed=seed)


@dataclass(frozen=True)
class Resize:
    """What ``AdaptiveBatchSize.end_epoch`` decided: the batch size of the next epoch and the factor
    to multiply the learning rate by now (1.0 when the batch size did not change)."""

    epoch: int
    old_batch_size: int
    batch_size: int
    lr_factor: float

    @property
    def changed(self) -> bool:
        return self.batch_size != self.old_batch_size


class AdaptiveBatchSize:
    """A batch-size policy driven as ``dbx run`` drives it, for a loop of your own.

    ``AdaptiveBatchSize(policy, params=None, *, dataset_size, lr_scaling="none", epochs=None, seed=0)``:
    ``policy`` is a name (built with ``build_policy``) or a policy object; ``lr_scaling`` is the
    spec's rule (``none``, ``linear``, ``sqrt``); ``epochs`` the planned number of epochs, passed to
    the policy in ``EpochState.epochs`` (default: the epoch just ended).

    ``batch_size`` is the batch size to train the next epoch with; ``lr_scale`` the product of the
    lr factors so far (what ``dbx run`` multiplies its scheduled lr by). ``state_dict()`` and
    ``load_state_dict()`` make a resumed loop choose what an uninterrupted one would.
    """

    def __init__(self, policy: str | BatchSizePolicy, params: dict[str, Any] | None = None, *, dataset_size: int,
                 lr_scaling: str = "none", epochs: int | None = None, seed: int = 0) -> None:
        try:
            rescale_factor(lr_scaling, 1, 2)
        except ValueError:
            raise PolicyError(f"lr_scaling={lr_scaling!r}: use 'none', 'linear' or 'sqrt' (as in a spec)") from None
        if isinstance(policy, str):
            self.name = policy
            self.policy = build_policy(policy, params, dataset_size=dataset_size, seed=seed)
        else:
            if params:
                raise PolicyError("params are for a policy given by name; this policy object is already built")
            self.name = type(policy).__name__
            self.policy = policy
        self.dataset_size = int(dataset_size)
        self.lr_scaling = lr_scaling
        self.epochs = epochs
        self.batch_size = _checked(self.policy.initial_batch_size(), self.name, "initial_batch_size()")
        self.lr_scale = 1.0
        self.step = 0
        self.samples_seen = 0

    def measures_in(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (1-based) should be measured: the policy reads diversity and asks."""
        return bool(self.policy.uses_diversity and self.policy.measures_in(epoch))

    def end_epoch(self, epoch: int, diversity: DiversityEstimate | None, *, lr: float = math.nan,
                  train_loss: float = math.nan, test_loss: float = math.nan, train_accuracy: float | None = None,
                  test_accuracy: float | None = None, steps: int | None = None,
                  samples: int | None = None) -> Resize:
        """The policy's decision after epoch ``epoch``, trained at ``batch_size``.

        ``diversity`` is the epoch's estimate (``meter.result``; None for an epoch not measured).
        The other numbers fill the ``EpochState`` the policy reads; ``steps`` and ``samples``
        default to one pass over ``dataset_size`` samples at ``batch_size``.
        """
        old = self.batch_size
        self.step += math.ceil(self.dataset_size / old) if steps is None else steps
        self.samples_seen += self.dataset_size if samples is None else samples
        state = EpochState(epoch=epoch, epochs=self.epochs or epoch, step=self.step, batch_size=old, lr=lr,
                           samples_seen=self.samples_seen, dataset_size=self.dataset_size, train_loss=train_loss,
                           test_loss=test_loss, train_accuracy=train_accuracy, test_accuracy=test_accuracy)
        new = _checked(self.policy.next_batch_size(state, diversity), self.name, "next_batch_size()")
        factor = 1.0
        if new != old:
            factor = rescale_factor(self.lr_scaling, old, new)
            if hasattr(self.policy, "lr_factor"):
                factor *= self.policy.lr_factor(old, new)
            self.lr_scale *= factor
            self.batch_size = new
        return Resize(epoch=epoch, old_batch_size=old, batch_size=new, lr_factor=factor)

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "batch_size": self.batch_size, "lr_scale": self.lr_scale,
                "step": self.step, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.batch_size = int(state["batch_size"])
        self.lr_scale = float(state["lr_scale"])
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])

    def __repr__(self) -> str:
        return f"AdaptiveBatchSize({self.name!r}, batch_size={self.batch_size}, lr_scaling={self.lr_scaling!r})"


def _checked(value: Any, name: str, call: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PolicyError(f"policy {name!r}: {call} returned {value!r}; a policy must return a positive int")
    return value

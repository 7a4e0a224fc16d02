"""The plugin contracts: what dbx calls on a policy, an estimator, a model or a dataset factory.

This module is the plugin author's manual. It holds no logic and imports nothing heavy; a plugin
may import from it freely, and what it names is kept stable across dbx releases.

How a plugin is found
---------------------
Each kind is an entry-point group; an entry point names a class or factory function::

    [options.entry_points]
    dbx.policies =
        myrule = my_package.policy:MyRule

How a plugin is configured
--------------------------
The factory's keyword-only parameters, with type hints and defaults, *are* its parameter schema.
``dbx validate`` checks a spec's ``params:`` against them (unknown names, missing required ones,
wrong types), so there is no second declaration to keep in sync. dbx also passes some keywords of
its own ("injected" below) when the factory's signature names them (or takes ``**kwargs``); they
are not settable from the spec.

What dbx injects, per kind:

================  ===================================================================
``dbx.policies``   ``dataset_size`` (int, training samples), ``seed`` (int)
``dbx.estimators`` ``seed`` (int)
``dbx.models``     ``num_classes`` (int or None for regression), ``input_shape`` (tuple)
``dbx.datasets``   ``root`` (str: the spec's data root, ``~`` and ``$VARS`` expanded), ``seed``
================  ===================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch is never imported by this module at run time
    import torch

__all__ = [
    "EpochState",
    "DiversityEstimate",
    "DataSplits",
    "BatchSizePolicy",
    "DiversityEstimator",
    "ModelFactory",
    "DatasetFactory",
]


@dataclass(frozen=True)
class EpochState:
    """What a policy may read about the epoch that just ended.

    ``epoch`` counts from 1: the state after the first epoch has ``epoch == 1``. Accuracies are
    fractions in [0, 1] (None for regression tasks); losses are means over samples.
    """

    epoch: int
    epochs: int
    step: int
    batch_size: int
    lr: float
    samples_seen: int
    dataset_size: int
    train_loss: float
    test_loss: float
    train_accuracy: float | None = None
    test_accuracy: float | None = None


@dataclass(frozen=True)
class DiversityEstimate:
    """The gradient diversity measured over one epoch (or one sample of it).

    ``value`` is sum_i ||g_i||^2 / ||sum_i g_i||^2 over ``samples`` per-sample gradients; it may be
    ``inf`` or ``nan`` when the summed gradient vanishes, and policies must handle that.
    ``per_layer`` maps a module path (``"layers.0"``) to the same ratio restricted to that layer's
    parameters (empty when the estimator does not compute it). ``seconds`` is the time the estimator
    itself spent, as far as it can tell.
    """

    value: float
    samples: int
    seconds: float = 0.0
    per_layer: dict[str, float] = field(default_factory=dict)
    sum_sq_norms: float | None = None
    sq_norm_of_sum: float | None = None


@dataclass
class DataSplits:
    """What a dataset factory returns.

    ``train`` and ``test`` are either a pair ``(inputs, targets)`` of tensors (small data: dbx keeps
    it on the training device and batches it by index, with no DataLoader) or a
    ``torch.utils.data.Dataset`` yielding ``(input, target)`` (large data: dbx wraps it in a
    DataLoader whose batch size it changes between epochs).

    ``num_classes`` is None for a regression task (dbx then uses mean squared error and reports no
    accuracy). ``augment`` is an optional batch-wise training augmentation for tensor data, called
    as ``augment(inputs, generator)`` on the training device; it must not change the batch size.
    """

    train: Any
    test: Any
    num_classes: int | None
    input_shape: tuple[int, ...]
    augment: Callable[["torch.Tensor", "torch.Generator"], "torch.Tensor"] | None = None
    description: str = ""


@runtime_checkable
class BatchSizePolicy(Protocol):
    """Decides the batch size of every epoch. Pure Python: numbers in, a number out.

    Constructed once per run as ``Factory(dataset_size=n, **params)``. The training loop then:

    1. calls ``initial_batch_size()`` once, before the first epoch;
    2. before each epoch ``e`` (1-based), calls ``measures_in(e)`` if ``uses_diversity`` is true;
       when it answers True the estimator watches that epoch's training steps;
    3. after each epoch calls ``next_batch_size(state, diversity)``, where ``diversity`` is the
       estimate gathered during that epoch (None when the epoch was not measured);
    4. when the answer differs from the current batch size, rescales the learning rate by the
       spec's ``lr_scaling`` rule times ``lr_factor(old, new)`` (if the policy defines it).

    A policy must not touch tensors, the model, the optimizer or MLflow; it must return a positive
    int; it should be deterministic given its state. Everything it needs to continue after a
    resume goes in ``state_dict()`` (plain Python values only), and ``load_state_dict`` restores it.
    """

    uses_diversity: bool

    def initial_batch_size(self) -> int: ...

    def measures_in(self, epoch: int) -> bool: ...

    def next_batch_size(self, state: EpochState, diversity: DiversityEstimate | None) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class DiversityEstimator(Protocol):
    """Measures gradient diversity during the epochs a policy asks for.

    Constructed once per run as ``Factory(**params)``. For a measuring epoch the loop calls:

    1. ``attach(model)`` before the first step (register hooks here, not at construction);
    2. after every micro-batch's ``loss.backward()``, ``on_backward(loss_scale)``, where the loss
       that was back-propagated equals ``loss_scale * sum_i loss_i`` over the micro-batch's
       per-sample losses; divide what the hooks saw by ``loss_scale`` to get per-sample gradients;
    3. once per optimizer step, before ``optimizer.step()``, ``on_step(loss_scale)``, when every
       parameter's ``.grad`` holds ``loss_scale * sum_i grad loss_i`` over the logical batch
       (weight decay is not in it);
    4. at the end of the epoch, ``estimate(model, loss_fn, data)`` returning a
       ``DiversityEstimate``; ``data`` is the training split (for estimators that draw their own
       samples at fixed weights);
    5. ``detach()`` to remove every hook; the next epochs train at full speed.

    The hooks run inside the training step: they must not synchronise with the device (no
    ``.item()``), log, or allocate per-sample gradients where the algebra avoids it. An estimator
    must not change the optimizer, the weights or the batch size. ``state_dict``/``load_state_dict``
    are optional; an online estimator that restarts its accumulation on resume needs neither.
    """

    def attach(self, model: "torch.nn.Module") -> None: ...

    def on_backward(self, loss_scale: float) -> None: ...

    def on_step(self, loss_scale: float) -> None: ...

    def estimate(self, model: "torch.nn.Module", loss_fn: Callable[..., Any], data: Any) -> DiversityEstimate: ...

    def detach(self) -> None: ...


class ModelFactory(Protocol):
    """``factory(*, num_classes, input_shape, **params) -> torch.nn.Module``.

    ``num_classes`` is None for regression: return one output. The module maps a batch of inputs
    of shape ``(B, *input_shape)`` to ``(B, num_classes)`` (or ``(B, 1)``). Build it on the CPU;
    dbx moves it to the device.
    """

    def __call__(self, *, num_classes: int | None, input_shape: tuple[int, ...], **params: Any) -> "torch.nn.Module": ...


class DatasetFactory(Protocol):
    """``factory(*, root, seed, **params) -> DataSplits``.

    Read data from ``root`` (never download unless the spec says ``download: true``). When the
    files are missing, raise ``dbx.errors.UserError`` saying where you looked and how to get them.
    """

    def __call__(self, **params: Any) -> DataSplits: ...

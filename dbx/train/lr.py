"""Learning-rate schedules and the rescale rules applied when the batch size changes.

The schedule is a pure function of the epoch, so resuming needs no scheduler object, and a
schedule keeps its shape in epochs when the batch size (and so the number of steps per epoch)
changes. The rescale is a separate factor that multiplies the scheduled lr and persists
(DiveBatch's "rescale" variant: at each resize lr *= B_next / B, on top of the schedule;
docs/algorithm.md).

Warm-up (``warmup_epochs: w``) multiplies any schedule but ``onecycle`` by ``e / w`` in epochs
``e = 1 .. w``: epoch 1 trains at ``lr / w``, epoch ``w`` at the full scheduled rate, and the
schedule itself counts from epoch 1, so a cosine that starts warm-up is already decaying.
"""
from __future__ import annotations

import bisect
import math
from typing import Any


def scheduled_lr(schedule: Any, base_lr: float, epoch: int, epochs: int) -> float:
    """The base schedule's lr for 1-based ``epoch`` (before any batch-size rescale).

    ``schedule`` is the spec's ScheduleSpec. With ``done = epoch - 1`` epochs completed:

    - ``constant``: base_lr;
    - ``cosine``: from base_lr down to min_lr along half a cosine over t_max epochs (default:
      all of them), ``min_lr + (base_lr - min_lr) (1 + cos(pi done / t_max)) / 2``;
    - ``linear``: from base_lr down to min_lr in a straight line over t_max epochs (default: all);
    - ``onecycle`` (Smith and Topin 2017, per epoch): up from ``base_lr / div_factor`` to base_lr
      in a straight line over the first ``pct_start`` of the epochs, then down to min_lr along
      half a cosine over the rest;
    - ``multistep``: times gamma at each milestone passed; ``step``: every step_size epochs.

    A linear warm-up over the first ``warmup_epochs`` epochs multiplies any of them but onecycle.
    """
    done = epoch - 1  # epochs completed before this one: the first epoch runs at the initial lr
    name = schedule.name
    if name == "constant":
        lr = base_lr
    elif name == "cosine":
        t_max = schedule.t_max or epochs
        lr = _cosine(base_lr, schedule.min_lr, min(done, t_max) / t_max)
    elif name == "linear":
        t_max = schedule.t_max or epochs
        lr = base_lr + (schedule.min_lr - base_lr) * min(done, t_max) / t_max
    elif name == "onecycle":
        rise = schedule.pct_start * epochs
        start = base_lr / schedule.div_factor
        if done < rise:
            lr = start + (base_lr - start) * done / rise
        else:
            lr = _cosine(base_lr, schedule.min_lr, (done - rise) / max(epochs - 1 - rise, 1e-12))
    elif name == "multistep":
        lr = base_lr * schedule.gamma ** bisect.bisect_right(list(schedule.milestones), done)
    elif name == "step":
        lr = base_lr * schedule.gamma ** (done // schedule.step_size)
    else:  # the spec schema admits no other name
        raise ValueError(f"unknown schedule {name!r}")
    if schedule.warmup_epochs and epoch <= schedule.warmup_epochs:
        lr *= epoch / schedule.warmup_epochs
    return lr


def _cosine(high: float, low: float, progress: float) -> float:
    return low + (high - low) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


#: Optimizer classes (by name, so that this module needs no torch) for which ``lr_scaling: auto``
#: means the linear rule; every other optimizer gets the square-root rule.
LINEAR_SCALING_OPTIMIZERS = frozenset({"SGD", "ASGD"})


def resolve_lr_scaling(rule: str, optimizer: Any) -> str:
    """The rule ``auto`` stands for with this optimizer; any other rule as it is.

    ``auto`` is ``linear`` for plain SGD (Goyal et al. 2017: a k times larger batch takes a k
    times larger step, as k small steps would), ``sqrt`` for adaptive methods such as Adam, AdamW
    or Adagrad (Malladi et al. 2022, "On the SDEs and scaling rules for adaptive gradient
    algorithms": the update is normalised by the gradient's second moment, whose noise part
    shrinks as 1/B, so matching the dynamics takes lr * sqrt(k); Granziol et al. 2022 find the
    same), unless the optimizer's class names its rule in an ``lr_scaling`` attribute. The
    default of the spec stays ``none``: a schedule runs as written unless asked, and DiveBatch's
    headline variant ("no rescale") is the default there too.
    """
    if rule != "auto":
        return rule
    declared = getattr(type(optimizer), "lr_scaling", None)
    if declared in ("none", "linear", "sqrt"):
        return declared
    classes = {cls.__name__ for cls in type(optimizer).__mro__}
    return "linear" if classes & LINEAR_SCALING_OPTIMIZERS else "sqrt"


def rescale_factor(rule: str, old_batch: int, new_batch: int) -> float:
    """How much the lr is multiplied by when the batch size goes from old to new.

    ``linear`` is Goyal et al.'s rule (and DiveBatch's "rescale" variant), ``sqrt`` keeps the
    noise scale of SGD (Krizhevsky 2014; Hoffer et al. 2017), ``none`` leaves the lr alone.
    """
    if rule == "none" or new_batch == old_batch:
        return 1.0
    ratio = new_batch / old_batch
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    raise ValueError(f"unknown lr_scaling rule {rule!r}")

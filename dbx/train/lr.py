"""Learning-rate schedules and the rescale rules applied when the batch size changes.

The schedule is a pure function of the epoch, so resuming needs no scheduler object; the rescale
is a separate factor that multiplies the scheduled lr and persists (DiveBatch's "rescale"
variant: at each resize lr *= B_next / B, on top of the schedule; docs/algorithm.md).
"""
from __future__ import annotations

import bisect
import math
from typing import Any


def scheduled_lr(schedule: Any, base_lr: float, epoch: int, epochs: int) -> float:
    """The base schedule's lr for 1-based ``epoch`` (before any batch-size rescale).

    ``schedule`` is the spec's ScheduleSpec. ``cosine`` anneals from base_lr to min_lr over t_max
    epochs (default: all of them), ``multistep`` multiplies by gamma at each milestone,
    ``step`` every step_size epochs. A linear warm-up over the first ``warmup_epochs`` epochs
    multiplies any of them.
    """
    done = epoch - 1  # epochs completed before this one: the first epoch runs at the initial lr
    name = schedule.name
    if name == "constant":
        lr = base_lr
    elif name == "cosine":
        t_max = schedule.t_max or epochs
        progress = min(done, t_max) / t_max
        lr = schedule.min_lr + (base_lr - schedule.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    elif name == "multistep":
        lr = base_lr * schedule.gamma ** bisect.bisect_right(list(schedule.milestones), done)
    elif name == "step":
        lr = base_lr * schedule.gamma ** (done // schedule.step_size)
    else:  # the spec schema admits no other name
        raise ValueError(f"unknown schedule {name!r}")
    if schedule.warmup_epochs and epoch <= schedule.warmup_epochs:
        lr *= epoch / schedule.warmup_epochs
    return lr


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

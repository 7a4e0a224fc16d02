"""The fixed-policy loop never waits for the device inside an epoch, and its step dispatches
hardly more operations than a bare loop's.

Every read of a device value into Python (``.item()``, ``bool(t)``, ``float(t)``) dispatches
``aten::_local_scalar_dense``, on the CPU as on CUDA, so counting that op with a
``TorchDispatchMode`` over a CPU epoch counts the host synchronisations a CUDA epoch would make.
"""
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dbx.spec import spec_from_dict
from dbx.train.loop import train_one_epoch
from dbx.train.parts import build_parts

SYNCS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")


class Ops(TorchDispatchMode):
    """Counts every aten operation dispatched inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func._schema.name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.counts.values())

    @property
    def syncs(self):
        return sum(self.counts[name] for name in SYNCS)


def parts_for(batch_size, **extra):
    spec = spec_from_dict({
        "name": "sync", "seed": 0, "device": "cpu",
        "data": {"name": "synthetic_logistic", "params": {"n": 400, "d": 8}},  # 320 training samples
        "model": {"name": "mlp", "params": {"widths": [8]}}, "optimizer": {"lr": 0.05}, "epochs": 1,
        "policy": {"name": "fixed", "params": {"batch_size": batch_size}},
        "checkpoint": {"enabled": False}, "tracking": {"system_metrics": False}, **extra,
    })
    return spec, build_parts(spec, torch.device("cpu"))


def count_epoch(batch_size, **kwargs):
    spec, parts = parts_for(batch_size)
    train_one_epoch(parts, None, None, lambda: None, **kwargs)  # warm-up: lazy state, caches
    with Ops() as ops:
        trained = train_one_epoch(parts, None, None, lambda: None, **kwargs)
    return ops, trained.steps


def test_a_fixed_policy_epoch_reads_the_device_a_constant_number_of_times():
    few, few_steps = count_epoch(160)
    many, many_steps = count_epoch(16)
    assert (few_steps, many_steps) == (2, 20)
    assert many.syncs == few.syncs <= 2, (few.counts, many.counts)


def test_the_counter_sees_a_per_step_read():
    """skip_step must look at each step's loss: the count grows with the steps (so the test above
    would see a per-step read, if there were one)."""
    few, _ = count_epoch(160, skip_nonfinite=True)
    many, _ = count_epoch(16, skip_nonfinite=True)
    assert many.syncs - few.syncs == 18


def bare_step_ops(batch_size):
    """Ops of one step of the loop a user would write over the same device-resident tensors."""
    _, parts = parts_for(batch_size)
    model, optimizer = parts.model, parts.optimizer  # the spec's SGD, as dbx's loop uses it
    x, y = parts.data.train
    order = torch.randperm(len(x))

    def epoch():
        loss_sum = torch.zeros(())
        for index in order.split(batch_size):
            loss = F.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        return loss_sum.item()

    epoch()
    with Ops() as few:
        epoch()
    return few


def test_a_dbx_step_dispatches_no_more_ops_than_a_bare_step():
    """Per step, dbx adds one argmax (train accuracy) to what a bare loop that keeps a running
    loss does, and saves that loop's two gathers (the loader gathers a block of batches at once),
    its running sum (the tally adds up once an epoch) and the ``ones_like`` that starts a plain
    ``backward()`` (dbx starts it from a cached ``1 / B``)."""
    per_step = {}
    for name, count in (("dbx", lambda b: count_epoch(b)[0]), ("bare", bare_step_ops)):
        few, many = count(160), count(16)  # 2 steps against 20
        per_step[name] = (many.total - few.total) / 18
    assert per_step["dbx"] <= per_step["bare"], per_step

"""The model under DistributedDataParallel, with gradients that add up like one process's.

dbx's step back-propagates ``loss_scale * sum_i loss_i`` with ``loss_scale`` one over the whole
logical batch (all ranks' samples or tokens), so each rank's gradient is its share of the batch
gradient and the batch gradient is their *sum*. DDP's default all-reduce averages (divides by the
world size); a communication hook that sums instead keeps the step, the lr and the estimators'
arithmetic exactly as in one process, and is right for shares of unequal size too.
"""
from __future__ import annotations

import contextlib
from typing import Any


def _sum_gradients(state, bucket):  # noqa: ANN001, ANN202 - DDP checks the annotations: none, or its own
    """DDP communication hook: all-reduce a gradient bucket as a sum (DDP's default divides it by
    the world size)."""
    import torch.distributed as dist

    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def distributed_parts(parts: Any, *, sync_batchnorm: bool = False) -> Any:
    """Set ``parts.net`` (what the training step calls): the model in DDP under torchrun, the model
    itself in one process. ``sync_batchnorm`` converts BatchNorm layers to SyncBatchNorm first, so
    that batch statistics are over the whole global batch instead of each rank's share.

    Call it after the model and its optimizer exist: DDP broadcasts rank 0's parameters and
    buffers, so every rank starts from the same weights whatever it built.
    """
    from dbx.distributed.group import is_distributed

    if not is_distributed():
        parts.net = parts.model
        return parts
    import torch
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm:
        if parts.device.type != "cuda":
            from dbx.errors import UserError

            raise UserError("model.sync_batchnorm: true needs CUDA devices (PyTorch's SyncBatchNorm works with GPU "
                            "modules only); on the CPU set it to false (each rank normalises with its slice's "
                            "statistics)")
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(parts.model)
        if converted is not parts.model:  # a bare BatchNorm as the whole model: keep one object
            raise ValueError("model.sync_batchnorm needs a model that contains its BatchNorm layers")
        if parts.estimator is not None:  # its layer hooks may not know SyncBatchNorm: say so before training
            parts.estimator.attach(parts.model)
            parts.estimator.detach()
    device_ids = [parts.device.index] if parts.device.type == "cuda" else None
    net = DistributedDataParallel(parts.model, device_ids=device_ids)
    net.register_comm_hook(None, _sum_gradients)
    parts.net = net
    return parts


def accumulating(net: Any, more_chunks: bool) -> Any:
    """The context of one micro-batch's forward and backward: while ``more_chunks`` of the same
    step follow, DDP keeps the gradient local (``no_sync``); the last micro-batch's backward
    all-reduces the accumulated sum once. In one process, a context that does nothing."""
    if more_chunks and hasattr(net, "no_sync"):
        return net.no_sync()
    return _NOTHING


_NOTHING = contextlib.nullcontext()  # reusable: no generator per micro-batch on the hot path

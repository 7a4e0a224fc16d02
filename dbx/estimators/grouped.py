"""Per-sample norms of many layers at once: layers of one shape share every operation.

On a GPU a measuring step is bound by the number of operations launched, not by their
arithmetic: per layer, the kernels in ``dbx.estimators.kernels`` take 15 to 40 small operations,
and a ResNet-18 has 41 parameter-owning layers. Most of them come in runs of equal shapes (a
stage's 3x3 convolutions, its BatchNorms), so the hooks can hold each layer's input and output
gradient until the end of the backward and then, per group of layers whose computation is the
same function of same-shaped tensors, stack the groups' tensors along the batch dimension and run
the computation once: a group of G layers at batch B is one call at batch G x B, whose (G x B)
norms are the G layers' rows. Per-sample norms are independent across samples, so stacking
layers is exactly stacking samples; the numbers are those of the per-layer kernels.

Fused weight gradients (see ``kernels``) are handled per group too: one batched product gives the
G x B per-sample weight gradients, one sum gives the G batch gradients, one ``_foreach_add_`` puts
them into the weights' ``.grad``. BatchNorm groups use the framework's batch-norm backward over
one (G x B x C)-channel sample, as the per-layer kernel does over B x C.

What is grouped: Conv1d/Conv2d calls and training-mode BatchNorm calls (batch statistics) of
modules called once in the forward, in float32/float64, whose stacked copies fit in
``GROUP_ELEMENTS`` (a group that does not is split; a single layer that does not goes on its
own). Everything else (modules called several times, eval-mode BatchNorm, other layer types)
runs through its per-layer kernel as before. The cost is memory: each grouped layer's output
gradient is held until the end of the backward (about one more activation-sized tensor per layer
at the end), plus the group's stacked copy.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from dbx.estimators import kernels as K

__all__ = ["group_key", "grouped_sq_norms", "GROUP_ELEMENTS"]

#: Upper bound, per code path, on the elements of one group's stacked inputs, output gradients and
#: per-sample weight gradients (a group that would exceed it is split into smaller groups).
GROUP_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}

_CONV_TYPES = (nn.Conv1d, nn.Conv2d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DTYPES = (torch.float32, torch.float64)


def group_key(module: nn.Module, ctx: Any, grad: Tensor, fused: bool) -> tuple | None:
    """What must be equal for two layer calls to share one computation; None: this call goes alone."""
    if grad.dtype not in _DTYPES or not grad.is_contiguous():
        return None
    trainable = (K._trainable(module, "weight"), K._trainable(module, "bias"))
    if isinstance(module, _CONV_TYPES):
        x = ctx
        if not isinstance(x, Tensor) or x.dtype != grad.dtype or not x.is_contiguous():
            return None
        return ("conv", type(module), module.in_channels, module.out_channels, module.kernel_size, module.stride,
                module.dilation, module.groups, module.padding, module.padding_mode,
                tuple(module._reversed_padding_repeated_twice), tuple(x.shape), tuple(grad.shape), x.dtype, x.device,
                fused, trainable)
    if isinstance(module, _BN_TYPES):
        x, mean, invstd = ctx
        if mean is None or x.dtype != grad.dtype or not x.is_contiguous():
            return None  # running statistics (eval mode): per layer
        return ("batchnorm", tuple(x.shape), tuple(grad.shape), x.dtype, x.device, mean.dtype, invstd.dtype, trainable)
    return None


def group_size(module: nn.Module, ctx: Any, grad: Tensor, fused: bool) -> int:
    """How many calls like this one a group may stack (``GROUP_ELEMENTS``); under 2: per layer."""
    x = ctx if isinstance(ctx, Tensor) else ctx[0]
    per_layer = x.numel() + grad.numel()
    if fused:  # the per-sample weight gradients too
        per_layer += grad.shape[0] * module.weight.numel()
    return GROUP_ELEMENTS.get(K.path_of(grad.device), 1 << 24) // max(1, per_layer)  # 0: too large alone


def grouped_sq_norms(modules: Sequence[nn.Module], ctxs: Sequence[Any], grads: Sequence[Tensor], key: tuple,
                     form: str) -> Tensor:
    """(G, B) squared per-sample gradient norms of G layers that share ``key``, in one computation.

    For fused calls the layers' batch weight gradients go to their ``.grad``, as the per-layer
    kernel does.
    """
    g, batch = len(modules), grads[0].shape[0]
    grad = _stacked(grads)
    if key[0] == "batchnorm":
        return _batchnorm(modules[0], ctxs, grad, g, batch)
    x = _stacked(ctxs)
    if not key[15]:  # not fused: the per-layer kernel, on a batch of G x B samples
        return K._conv_sq_norms(modules[0], [x], [grad], form).view(g, batch)
    return _conv_fused(modules, x, grad, g, batch)


def _stacked(tensors: Sequence[Tensor]) -> Tensor:
    """The (G x B, ...) concatenation of G (B, ...) tensors: one copy, none for a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


def _conv_fused(modules: Sequence[nn.Module], x: Tensor, grad: Tensor, g: int, batch: int) -> Tensor:
    """Explicit per-sample weight gradients of G stacked calls, their G batch sums into ``.grad``."""
    module = modules[0]
    groups, c_out = module.groups, module.out_channels
    cg = module.in_channels // groups
    kernel, stride, dilation = tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)
    x, pad = K._conv_padding(module, x)
    n = g * batch
    if K._pointwise(kernel, pad):
        per_sample = K._pointwise_sample_grads(x, grad, stride, groups)
    else:
        weight_grad = torch.nn.grad.conv1d_weight if x.dim() == 3 else torch.nn.grad.conv2d_weight
        per_sample = weight_grad(x.reshape(1, n * x.shape[1], *x.shape[2:]), (n * c_out, cg, *kernel),
                                 grad.reshape(1, n * c_out, *grad.shape[2:]), stride=stride, padding=pad,
                                 dilation=dilation, groups=n * groups).view(n, -1)
    total = K._sq(per_sample, 1)
    if K._trainable(module, "bias"):
        total = total + K._sq(grad.reshape(n, c_out, -1).sum(-1, dtype=K._acc(grad)), 1)
    sums = per_sample.view(g, batch, -1).sum(1).view(g, *module.weight.shape)
    _add_weight_grads([m.weight for m in modules], sums)
    return total.view(g, batch)


def _add_weight_grads(weights: list[Tensor], sums: Tensor) -> None:
    """``weight.grad += sums[k]`` for each weight (set where there is none), as autograd accumulates."""
    sums = sums.to(weights[0].dtype)
    rows = sums.unbind(0)
    have = [(w.grad, r) for w, r in zip(weights, rows, strict=True) if w.grad is not None]
    for w, r in zip(weights, rows, strict=True):
        if w.grad is None:  # a view of ``sums`` (one buffer for the group), or a copy in the weight's layout
            w.grad = r if w.is_contiguous() else torch.empty_like(w).copy_(r)
    if have:
        torch._foreach_add_([h for h, _ in have], [r for _, r in have])


def _batchnorm(module: nn.Module, ctxs: Sequence[Any], grad: Tensor, g: int, batch: int) -> Tensor:
    """Per-sample norms of G training-mode BatchNorms: the weight and bias gradients of one batch
    norm over one sample whose channels are the G x B x C (layer, sample, channel) triples."""
    x = _stacked([c[0] for c in ctxs])
    channels = x.shape[1]
    n = g * batch
    stats = torch.stack([c[1] for c in ctxs] + [c[2] for c in ctxs]).to(grad.dtype)  # (2G, C)
    stats = stats.view(2, g, 1, channels).expand(2, g, batch, channels).reshape(2, n, channels)
    mean, invstd = stats.unbind(0)
    w, b = K._batchnorm_sample_grads(x.view(n, channels, -1), grad.view(n, channels, -1), mean, invstd)
    trainable = K._trainable(module, "weight"), K._trainable(module, "bias")
    if all(trainable):  # both gradients' squares in one reduction
        return K._sq(torch.stack([w, b], 1), (1, 2)).view(g, batch)
    if any(trainable):
        return K._sq(w if trainable[0] else b, 1).view(g, batch)
    return grad.new_zeros(g, batch, dtype=K._acc(grad))

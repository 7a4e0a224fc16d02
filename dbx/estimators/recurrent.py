"""``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` measured from the step's own backward.

The fused recurrent kernels keep the gate pre-activations to themselves. While the hooks are
attached, a measured recurrent module runs the same recurrence written out: per layer and
direction, the input projection of all time steps in one ``F.linear`` (``xi = x W_ih^T + b_ih``),
then the steps, each adding ``h_{t-1} W_hh^T + b_hh``. The gradient reaching ``xi`` is then, for
every step t, the gradient of the gate pre-activations ``dG_t``, and sample i's parameter gradients
are sums over its steps:

    W_ih: sum_t dG_t x_t^T,   W_hh: sum_t dH_t h_{t-1}^T,   b_ih: sum_t dG_t,   b_hh: sum_t dH_t,

with ``dH = dG`` for RNN and LSTM, and for GRU the new-gate part multiplied by the reset gate (it
multiplies ``h W_hn^T + b_hn``). Each is a linear layer over T positions
(``dbx.estimators.kernels.sum_outer_sq_norms``). ``batch_first`` both ways, several layers,
bidirectional, initial states and dropout between layers (the step's own mask) behave as in
PyTorch's forward; the self-check compares the gradients with PyTorch's own on the first step of
every measuring epoch. ``proj_size`` goes to the generic fallback; packed sequences and unbatched
inputs are refused with a clear error.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dbx.estimators import kernels as K

__all__ = ["supports", "install"]

_TYPES = (nn.RNN, nn.LSTM, nn.GRU)


def supports(module: nn.Module) -> bool:
    """Whether this rule measures ``module`` (else: the generic fallback)."""
    return type(module) in _TYPES and getattr(module, "proj_size", 0) == 0


class _Installed:
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def install(hooks: Any, layer: Any) -> _Installed:
    """Make ``layer.module`` run the written-out recurrence while the hooks are attached."""
    module = layer.module
    original = type(module).forward
    module.forward = partial(_forward, hooks, layer, module, original)
    return _Installed(module)


def _forward(hooks: Any, layer: Any, module: nn.RNNBase, original: Any, input: Any, hx: Any = None) -> Any:
    from dbx.estimators.hooks import ROOT, EstimatorConfigError, _transforms_active, claim_the_only_call, display

    if not (hooks.enabled and torch.is_grad_enabled()) or _transforms_active():
        return original(module, input, hx)
    if not isinstance(input, Tensor) or input.dim() != 3:
        what = "a PackedSequence (samples interleaved by length; pad the batch instead)" if not isinstance(
            input, Tensor) else f"unbatched (shape {tuple(input.shape)})"
        raise EstimatorConfigError(
            f"estimator {hooks.estimator!r} cannot measure the {type(module).__name__} {display(layer.path)!r} per "
            f"sample: its input is {what}. Leave it out with estimator.params.exclude: [{layer.path or ROOT!r}], or "
            f"use the 'subsampled' estimator."
        )
    claim_the_only_call(hooks, layer, type(module).__name__)
    lstm, gru = isinstance(module, nn.LSTM), isinstance(module, nn.GRU)
    x = input if module.batch_first else input.transpose(0, 1)  # (B, T, F)
    batch, steps = x.shape[0], x.shape[1]
    dirs = 2 if module.bidirectional else 1
    size = module.hidden_size
    if hx is None:
        zeros = x.new_zeros(module.num_layers * dirs, batch, size)
        h0, c0 = zeros, (zeros if lstm else None)
    else:
        h0, c0 = (hx if lstm else (hx, None))
    h_last, c_last = [], []
    record = partial(_gate_norms, hooks, layer)
    for number in range(module.num_layers):
        outputs = []
        for d in range(dirs):
            suffix = f"l{number}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(module, f"weight_ih_{suffix}"), getattr(module, f"weight_hh_{suffix}")
            b_ih = getattr(module, f"bias_ih_{suffix}") if module.bias else None
            b_hh = getattr(module, f"bias_hh_{suffix}") if module.bias else None
            xi = F.linear(x, w_ih, b_ih)  # (B, T, gates * H): every step's input projection at once
            index = number * dirs + d
            h, c = h0[index], (c0[index] if lstm else None)
            order = range(steps - 1, -1, -1) if d else range(steps)
            hs: list[Tensor] = [None] * steps  # type: ignore[list-item]
            previous: list[Tensor] = [None] * steps  # type: ignore[list-item]
            resets: list[Tensor] = [None] * steps  # type: ignore[list-item]
            for t in order:
                previous[t] = h
                hh = F.linear(h, w_hh, b_hh)
                if lstm:
                    i, f, g, o = (xi[:, t] + hh).chunk(4, dim=-1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                elif gru:
                    xr, xz, xn = xi[:, t].chunk(3, dim=-1)
                    hr, hz, hn = hh.chunk(3, dim=-1)
                    r = torch.sigmoid(xr + hr)
                    z = torch.sigmoid(xz + hz)
                    n = torch.tanh(xn + r * hn)
                    h = (1 - z) * n + z * h
                    resets[t] = r
                else:
                    pre = xi[:, t] + hh
                    h = torch.tanh(pre) if module.nonlinearity == "tanh" else torch.relu(pre)
                hs[t] = h
            h_last.append(h)
            if lstm:
                c_last.append(c)
            if xi.requires_grad:
                reset = torch.stack(resets, 1).detach() if gru else None
                xi.register_hook(partial(record, x.detach(), torch.stack(previous, 1).detach(), reset,
                                         (w_ih.requires_grad, w_hh.requires_grad,
                                          b_ih is not None and b_ih.requires_grad,
                                          b_hh is not None and b_hh.requires_grad)))
            outputs.append(torch.stack(hs, 1))
        x = outputs[0] if dirs == 1 else torch.cat(outputs, -1)
        if module.training and module.dropout > 0 and number < module.num_layers - 1:
            x = F.dropout(x, p=module.dropout)
    out = x if module.batch_first else x.transpose(0, 1)
    h_n = torch.stack(h_last)
    return (out, (h_n, torch.stack(c_last))) if lstm else (out, h_n)


def _gate_norms(hooks: Any, layer: Any, x: Tensor, previous: Tensor, reset: Tensor | None, trainable: tuple,
                grad: Tensor) -> None:
    """One layer and direction's per-sample squared norms, from the gradient ``grad`` (B, T, gates * H)
    of its input projections, added to the module's."""
    start = time.perf_counter()
    with_ih, with_hh, with_bih, with_bhh = trainable
    g = K._f32(grad)
    if reset is None:
        recurrent = g
    else:  # GRU: the new gate's recurrent term is multiplied by the reset gate
        r, z, n = g.chunk(3, dim=-1)
        recurrent = torch.cat([r, z, n * K._f32(reset)], -1)
    total = torch.zeros(g.shape[0], dtype=K._acc(g), device=g.device)
    for a, b, weight, bias in ((x, g, with_ih, with_bih), (previous, recurrent, with_hh, with_bhh)):
        if weight:
            t, i, o = a.shape[1], a.shape[2], b.shape[2]
            total = total + K._cat([K.sum_outer_sq_norms(a[s:e], b[s:e], hooks.form)
                                    for s, e in K._chunks(a.shape[0], K._outer_cost(t, i, o), b.device)], 0)
        if bias:
            total = total + K._sq(b.sum(1), 1)
    if hooks.enabled:
        hooks._store(layer, total)
    hooks.seconds += time.perf_counter() - start

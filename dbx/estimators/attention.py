"""``nn.MultiheadAttention`` measured from the step's own backward, with no extra computation.

Its forward hands ``in_proj_weight`` and ``out_proj.weight`` to ``F.multi_head_attention_forward``,
so no Linear module is ever called and the projections' inputs and output gradients stay inside
that function. While the hooks are attached, a measured MultiheadAttention runs the same
computation written out (the projections as ``F.linear``, attention through
``F.scaled_dot_product_attention`` or, when the weights are asked for, explicitly; batch-first
throughout, so that each sample's projections and gradients are contiguous) with gradient
hooks on the projections' outputs: each projection is then a linear layer whose per-sample norms
come from ``dbx.estimators.kernels.sum_outer_sq_norms`` (Gram or explicit form, the cheaper), and
the module's norm is the sum over its four projections and biases. The masks (``attn_mask`` 2-d or
3-d, bool or float, ``key_padding_mask``, ``is_causal``), ``batch_first`` both ways, ``kdim``/``vdim``
and dropout behave as in PyTorch's own forward (the self-check compares the gradients with it on
the first step of every measuring epoch). ``add_bias_kv`` and ``add_zero_attn`` go to the generic
fallback instead.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dbx.estimators import kernels as K

__all__ = ["supports", "install"]


def supports(module: nn.Module) -> bool:
    """Whether ``module`` is a MultiheadAttention this rule measures (else: the generic fallback)."""
    return (isinstance(module, nn.MultiheadAttention) and type(module).forward is nn.MultiheadAttention.forward
            and module.bias_k is None and module.bias_v is None and not module.add_zero_attn)


class _Installed:
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        if "forward" in self.module.__dict__:
            del self.module.__dict__["forward"]


def install(hooks: Any, layer: Any) -> _Installed:
    """Make ``layer.module`` run the written-out forward while the hooks are attached."""
    module = layer.module
    module.forward = partial(_forward, hooks, layer, module)
    return _Installed(module)


def _forward(hooks: Any, layer: Any, module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
             key_padding_mask: Tensor | None = None, need_weights: bool = True, attn_mask: Tensor | None = None,
             average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    from dbx.estimators.hooks import ROOT, EstimatorConfigError, _transforms_active, claim_the_only_call, display

    if not (hooks.enabled and torch.is_grad_enabled()) or _transforms_active():
        return nn.MultiheadAttention.forward(module, query, key, value, key_padding_mask, need_weights, attn_mask,
                                             average_attn_weights, is_causal)
    if query.dim() != 3 or query.is_nested:
        raise EstimatorConfigError(
            f"estimator {hooks.estimator!r} cannot measure the MultiheadAttention {display(layer.path)!r} per sample: "
            f"its query is {'nested' if query.is_nested else f'unbatched (shape {tuple(query.shape)})'}. Leave it "
            f"out with estimator.params.exclude: [{layer.path or ROOT!r}], or use the 'subsampled' estimator."
        )
    claim_the_only_call(hooks, layer, "MultiheadAttention")
    if not module.batch_first:  # work batch-first: projections and their gradients contiguous per sample
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    batch, length, embed = query.shape
    heads, head_dim = module.num_heads, module.head_dim
    source = key.shape[1]
    w, b = module.in_proj_weight, module.in_proj_bias
    record = partial(_projection_norms, hooks, layer)
    if module._qkv_same_embed_dim and query is key and key is value:
        fused = _fusing(hooks, query, w, b, length)
        qkv = F.linear(query, w.detach() if fused else w, b)
        _watch(qkv, record, query, w, b, fused)
        q, k, v = qkv.chunk(3, dim=-1)
    else:
        if module._qkv_same_embed_dim:
            wq, wk, wv = w.chunk(3)
        else:
            wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
        bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        for out, x, weight in ((q, query, wq), (k, key, wk), (v, value, wv)):
            _watch(out, record, x, weight, b)  # weights as chunks of a Parameter: not fused
    mask = _merged_mask(attn_mask, key_padding_mask, q.dtype, batch, heads, length, source, is_causal, need_weights)
    causal = is_causal and mask is None
    q = q.reshape(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, L, head_dim)
    k = k.reshape(batch, source, heads, head_dim).transpose(1, 2)
    v = v.reshape(batch, source, heads, head_dim).transpose(1, 2)
    dropout = module.dropout if module.training else 0.0
    weights = None
    if need_weights:
        scores = torch.matmul(q * (1.0 / math.sqrt(head_dim)), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1)
        if dropout > 0:
            probs = F.dropout(probs, p=dropout)
        attended = torch.matmul(probs, v)
        # returned as PyTorch does: after dropout, and as a new view (its gradient is only the caller's)
        weights = probs.mean(1) if average_attn_weights else probs.view(batch, heads, length, source)
    else:
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    attended = attended.transpose(1, 2).reshape(batch, length, embed)  # (B, L, E)
    wo, bo = module.out_proj.weight, module.out_proj.bias
    fused = _fusing(hooks, attended, wo, bo, length)
    out = F.linear(attended, wo.detach() if fused else wo, bo)
    _watch(out, record, attended, wo, bo, fused)
    if not module.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _merged_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, dtype: torch.dtype, batch: int,
                 heads: int, length: int, source: int, is_causal: bool, need_weights: bool) -> Tensor | None:
    """One additive float mask broadcastable to (B, H, L, S), as F.multi_head_attention_forward builds it."""
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint")
    if is_causal and key_padding_mask is None and not need_weights:
        return None  # PyTorch trusts the hint and lets the attention kernel apply the causal mask
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype)
        mask = mask.view(1, 1, length, source) if mask.dim() == 2 else mask.view(batch, heads, length, source)
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, dtype).view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _fusing(hooks: Any, x: Tensor, weight: Tensor, bias: Tensor | None, positions: int) -> bool:
    """Whether this projection runs with its weight detached, the kernel supplying its gradient from
    the per-sample gradients it computes anyway (as for Linear layers: ``kernels._linear_plan``)."""
    if not (hooks.fuse and weight.requires_grad and weight.is_leaf and hooks.form == "auto"):
        return False
    if not (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False  # the output would leave the graph, and with it the hook
    i, o = weight.shape[1], weight.shape[0]
    return positions * positions * (i + o) > i * o * K.FUSED_ELEMENT_MACS.get(x.device.type, 64)


def _watch(out: Tensor, record: Any, x: Tensor, weight: Tensor, bias: Tensor | None, fused: bool = False) -> None:
    if out.requires_grad:
        out.register_hook(partial(record, x, weight if fused else None, weight.requires_grad,
                                  bias is not None and bias.requires_grad))


def _projection_norms(hooks: Any, layer: Any, x: Tensor, fused: Tensor | None, with_weight: bool, with_bias: bool,
                      grad: Tensor) -> None:
    """Per-sample squared norms of one projection's weight (and bias) gradient, added to the layer's;
    for a ``fused`` weight, the batch sum of its per-sample gradients goes to its ``.grad``."""
    import time

    start = time.perf_counter()
    a, g = x, grad  # (B, T, in), (B, T, out)
    n, t, i, o = a.shape[0], a.shape[1], a.shape[2], g.shape[2]
    device = g.device.type
    with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else _nothing():
        total = torch.zeros(n, dtype=K._acc(g), device=g.device)
        if fused is not None:
            parts, batch = [], None
            for s, e in K._chunks(n, 2 * i * o + t * (i + o), g.device):
                per_sample = torch.bmm(K._f32(g[s:e]).mT, K._f32(a[s:e]))  # (b, out, in)
                parts.append(K._sq(per_sample, (1, 2)))
                batch = K._add_batch_sum(batch, per_sample.view(e - s, -1))
            K.accumulate_grad(fused, batch)
            total = total + K._cat(parts, 0)
        elif with_weight:
            parts = [K.sum_outer_sq_norms(a[s:e], g[s:e], hooks.form) for s, e in K._chunks(n, K._outer_cost(t, i, o),
                                                                                           g.device)]
            total = total + K._cat(parts, 0)
        if with_bias:
            total = total + K._sq(g.sum(1, dtype=K._acc(g)), 1)
    if hooks.enabled:
        hooks._store(layer, total)
    hooks.seconds += time.perf_counter() - start


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None

"""The generic per-module fallback of ``exact``, and where each module keeps the batch.

For a module without a dedicated kernel (Conv3d, ConvTranspose, EmbeddingBag, PReLU, Bilinear,
``nn.RNN``/``nn.LSTM``/``nn.GRU``, ``nn.MultiheadAttention``, a user's layer), the hooks record
each call's inputs and the gradients autograd delivers to its outputs during the step's own
backward. Afterwards the per-sample gradients of the module's parameters are

    g_i = vjp of (module alone, at sample i's inputs) applied to sample i's output gradient,

evaluated for all samples at once with ``torch.func.vmap`` (or sample by sample where vmap has no
rule for an operator), from those records: no second pass over the model, and exact, because a
module that treats samples independently has the per-sample gradient of sample i determined by
sample i's input and output gradient alone. Several calls of the module in one forward add their
per-sample gradients before squaring.

Modules that couple samples cannot be measured this way and are refused with a clear error:
BatchNorm-like layers in training mode, and anything whose forward draws random numbers (dropout
in training mode; its mask could not be reproduced per sample). Recurrent and attention modules
read the batch from their own ``batch_first``: the model's batch is dimension 0 of its input, and a
time-major layer (``batch_first=False``) has it in dimension 1 of its sequence inputs (and of an
RNN's hidden states), whatever the sizes. ``nn.MultiheadAttention`` is measured as one module
with ``out_proj``'s parameters, because its forward reads ``out_proj.weight`` itself and never
calls ``out_proj``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from dbx.estimators import kernels as K

__all__ = ["FALLBACK", "fallback_kernel", "claims_children", "fallback_params", "input_batch_dims",
           "output_batch_dims", "per_sample_grads", "FallbackCall"]

FALLBACK = "fallback"


def claims_children(module: nn.Module) -> bool:
    """Modules whose forward uses their children's parameters directly (measured as a whole)."""
    return isinstance(module, nn.MultiheadAttention)


def fallback_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters the fallback measures for ``module``: its own, and its children's
    for modules that use them directly (``claims_children``). Names are relative to ``module``."""
    named = module.named_parameters() if claims_children(module) else module._parameters.items()
    return [(n, p) for n, p in named if p is not None and p.requires_grad]


def _bound(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    try:
        return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return None


def _dims_of(value: Any, dim: int | None) -> Any:
    return pytree.tree_map(lambda v: dim if isinstance(v, Tensor) and v.dim() > (dim or 0) else None, value)


def time_major_parent(module: nn.Module) -> bool:
    """A Transformer layer whose children all see time-major ``(T, B, ...)`` tensors."""
    kinds = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    return isinstance(module, kinds) and not module.self_attn.batch_first  # the layer keeps it in its attention


def input_batch_dims(module: nn.Module, args: tuple, kwargs: dict, batch_dim: int | None = None) -> Any:
    """A pytree like ``(args, kwargs)``: for each tensor the dimension that holds the samples, or None
    for tensors shared by all samples (an attention mask). ``batch_dim``: the dimension every input
    of the module keeps the samples in, where the parent's semantics say so (a time-major layer)."""
    if batch_dim is not None and not isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
        return pytree.tree_map(lambda v: batch_dim if isinstance(v, Tensor) and v.dim() > batch_dim else None,
                               (args, kwargs))
    special = _special_dims(module)
    if special is None:
        if K.kernel_for(module) is not None:  # the built-in kernels read the first input only
            dims = pytree.tree_map(lambda v: None, (args, kwargs))
            first = 0 if args else None
            if first is not None:
                return ((_dims_of(args[0], 0),) + tuple(dims[0][1:]), dims[1])
            return dims
        return pytree.tree_map(lambda v: 0 if isinstance(v, Tensor) and v.dim() > 0 else None, (args, kwargs))
    names = list(inspect.signature(module.forward).parameters)
    arg_dims = []
    for i, a in enumerate(args):
        arg_dims.append(_dims_of(a, special.get(names[i] if i < len(names) else "", None)))
    kw_dims = {k: _dims_of(v, special.get(k, None)) for k, v in kwargs.items()}
    return (tuple(arg_dims), kw_dims)


def _special_dims(module: nn.Module) -> dict[str, int | None] | None:
    if isinstance(module, nn.RNNBase):
        return {"input": 0 if module.batch_first else 1, "hx": 1}
    if isinstance(module, nn.MultiheadAttention):
        bd = 0 if module.batch_first else 1
        return {"query": bd, "key": bd, "value": bd, "key_padding_mask": 0, "attn_mask": None}
    return None


def output_batch_dims(module: nn.Module, output: Any, batch_dim: int | None = None) -> list[int | None]:
    """For each tensor leaf of ``output``, the dimension that holds the samples."""
    leaves = pytree.tree_leaves(output)
    if batch_dim is not None and not isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
        return [batch_dim if isinstance(v, Tensor) and v.dim() > batch_dim else None for v in leaves]
    if isinstance(module, nn.RNNBase):
        first = 0 if module.batch_first else 1
        return [first] + [1] * (len(leaves) - 1)
    if isinstance(module, nn.MultiheadAttention):
        return [0 if module.batch_first else 1] + [0] * (len(leaves) - 1)
    return [0 if isinstance(v, Tensor) and v.dim() > 0 else None for v in leaves]


@dataclass(eq=False)
class FallbackCall:
    """One call of a fallback module: its inputs, where they keep the batch, its outputs' gradients."""

    args: tuple
    kwargs: dict
    in_dims: Any
    out_dims: list[int | None]
    grads: list[Tensor | None]
    training: bool
    n: int  # samples
    path: str
    shared: frozenset[int] = frozenset()  # ids of shared parameters: their per-sample gradients go to ``sink``
    sink: dict[int, Tensor] | None = None


def refusal(module: nn.Module, path: str, args: tuple, kwargs: dict, batch: int | None) -> str | None:
    """Why the fallback cannot measure this call of ``module`` (None when it can)."""
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
            return (f"it contains {type(sub).__name__} in training mode, whose batch statistics couple the "
                    f"samples")
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.scale_grad_by_freq:
        return ("its scale_grad_by_freq divides each row's gradient by that token's count in the whole batch, "
                "which couples the samples (the batch gradient is not the sum of per-sample gradients)")
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
        return "its gradient is sparse"
    if isinstance(module, nn.RNNBase) and module.training and module.dropout > 0:
        return f"its dropout ({module.dropout}) between layers draws a random mask the fallback cannot repeat"
    if isinstance(module, nn.MultiheadAttention) and module.training and module.dropout > 0:
        return f"its attention dropout ({module.dropout}) draws a random mask the fallback cannot repeat"
    leaves = pytree.tree_leaves((args, kwargs))
    if any(isinstance(v, nn.utils.rnn.PackedSequence) for v in list(args) + list(kwargs.values())) or any(
            type(v).__name__ == "PackedSequence" for v in leaves):
        return "its input is a PackedSequence (samples are interleaved by length); pad the batch instead"
    if isinstance(module, nn.MultiheadAttention):
        mask = _bound(module, args, kwargs) or {}
        attn_mask = mask.get("attn_mask")
        if isinstance(attn_mask, Tensor) and attn_mask.dim() == 3:
            return "its attn_mask is 3-d (batch and heads folded together); pass a 2-d mask and key_padding_mask"
        query = mask.get("query")
        if isinstance(query, Tensor) and query.dim() == 2:
            return "its input is unbatched (2-d)"
    if isinstance(module, nn.RNNBase):
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, Tensor) and x.dim() == 2:
            return "its input is unbatched (2-d)"
    return None


def per_sample_grads(module: nn.Module, names: list[str], call: FallbackCall, batch: int) -> dict[str, Tensor]:
    """``{name: (batch, *shape)}`` per-sample gradients of ``module``'s parameters ``names`` for one call."""
    from torch.func import functional_call, grad, vmap

    leaves, spec = pytree.tree_flatten((call.args, call.kwargs))
    dims = pytree.tree_leaves(call.in_dims, is_leaf=lambda x: x is None)
    batched = [k for k, (v, d) in enumerate(zip(leaves, dims, strict=True)) if isinstance(v, Tensor) and d is not None]
    with_grad = [k for k, g in enumerate(call.grads) if g is not None]
    everything = dict(module.named_parameters())
    params = {n: everything[n].detach() for n in names}
    fixed = {n: p.detach() for n, p in everything.items() if n not in params}
    buffers = {n: b.detach() for n, b in module.named_buffers()}

    def one(p: dict[str, Tensor], xs: list[Tensor], gs: list[Tensor]) -> Tensor:
        full = list(leaves)
        for k, x in zip(batched, xs, strict=True):
            full[k] = x.unsqueeze(dims[k])
        a, kw = pytree.tree_unflatten(full, spec)
        was = module.training
        module.training = call.training
        try:
            out = pytree.tree_leaves(functional_call(module, (p, fixed, buffers), a, kw))
        finally:
            module.training = was
        total = None
        for k, g in zip(with_grad, gs, strict=True):
            term = (out[k] * g.unsqueeze(call.out_dims[k]).to(out[k].dtype)).sum()
            total = term if total is None else total + term
        return total

    xs = [leaves[k] for k in batched]
    gs = [call.grads[k] for k in with_grad]
    in_dims = (None, [dims[k] for k in batched], [call.out_dims[k] for k in with_grad])
    if type(module) not in _NO_VMAP:
        try:
            return vmap(grad(one), in_dims=in_dims, randomness="error")(params, xs, gs)
        except RuntimeError as error:
            if "random" in str(error).lower():
                raise _RandomForward(str(error)) from error
            _NO_VMAP.add(type(module))
    rows: dict[str, list[Tensor]] = {n: [] for n in names}
    before = torch.get_rng_state()
    for i in range(batch):
        xi = [x.select(d, i) for x, d in zip(xs, in_dims[1], strict=True)]
        gi = [g.select(d, i) for g, d in zip(gs, in_dims[2], strict=True)]
        for n, g in grad(one)(params, xi, gi).items():
            rows[n].append(g)
        if i == 0 and not torch.equal(before, torch.get_rng_state()):
            raise _RandomForward("the forward drew random numbers")
    return {n: torch.stack(r) for n, r in rows.items()}


#: module types for which vmap failed once (measured sample by sample from then on)
_NO_VMAP: set[type] = set()


class _RandomForward(RuntimeError):
    """The module's forward draws random numbers (dropout in training mode)."""


def _fallback_sq_norms(module: nn.Module, ctxs: list[FallbackCall], refs: list[Tensor], form: str,
                       fused: list[bool] | None = None) -> Tensor:
    from dbx.estimators.hooks import ROOT, EstimatorConfigError, display

    names = [n for n, _ in fallback_params(module)]
    total: dict[str, Tensor] = {}
    for call in ctxs:
        if not any(g is not None for g in call.grads):
            continue
        try:
            grads = per_sample_grads(module, names, call, call.n)
        except _RandomForward as error:
            raise EstimatorConfigError(
                f"estimator 'exact': module {display(call.path)!r} ({type(module).__name__}) draws random numbers "
                f"in its forward (dropout in training mode?), so its per-sample gradients cannot be recomputed "
                f"from the step ({error}). Set its dropout to 0, leave it out with estimator.params.exclude: "
                f"[{call.path or ROOT!r}], or use the 'subsampled' estimator."
            ) from error
        params = dict(module.named_parameters())
        for name, g in grads.items():
            pid = id(params[name])
            if pid in call.shared and call.sink is not None:  # squared once all its uses are in
                call.sink[pid] = g if pid not in call.sink else call.sink[pid] + g
                continue
            total[name] = g if name not in total else total[name] + g
    if not total:
        n = ctxs[0].n
        return torch.zeros(n, dtype=K._acc(refs[0]), device=refs[0].device)
    return sum(K._sq(g.flatten(1), 1) for g in total.values())


def fallback_kernel() -> K.Kernel:
    return _KERNEL


_KERNEL = K.Kernel(FALLBACK, (nn.Module,), _fallback_sq_norms, param_names=())


def forward_hook(hooks: Any, layer: Any, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """``NormHooks``' forward hook for fallback layers: record the call, and hooks on its outputs that
    keep their gradients; the per-sample norms are computed when the hooks collect."""
    from dbx.estimators.hooks import ROOT, EstimatorConfigError, _transforms_active, display

    if not (hooks.enabled and torch.is_grad_enabled()) or _transforms_active():
        return
    leaves = pytree.tree_leaves(output)
    outs = [v if isinstance(v, Tensor) and v.requires_grad else None for v in leaves]
    if not any(o is not None for o in outs):
        return
    batch = hooks.batch
    why = refusal(module, layer.path, args, kwargs, batch)
    if why is not None:
        raise EstimatorConfigError(
            f"estimator {hooks.estimator!r} cannot measure module {display(layer.path)!r} ({type(module).__name__}) "
            f"per sample: {why}. Leave it out with estimator.params.exclude: [{layer.path or ROOT!r}], or use the "
            f"'subsampled' estimator."
        )
    in_dims = input_batch_dims(module, args, kwargs, hooks.batch_dims.get(layer.path))
    out_dims = output_batch_dims(module, output, hooks.batch_dims.get(layer.path))
    for v, d in zip(pytree.tree_leaves((args, kwargs)), pytree.tree_leaves(in_dims, is_leaf=lambda x: x is None),
                    strict=True):
        if isinstance(v, Tensor) and d is not None and (batch is None or v.shape[d] != batch):
            raise EstimatorConfigError(
                f"estimator {hooks.estimator!r}: module {display(layer.path)!r} ({type(module).__name__}) received "
                f"an input of shape {tuple(v.shape)} whose dimension {d} should hold the model's {batch} samples. "
                f"Exclude it with estimator.params.exclude: [{layer.path or ROOT!r}], or use the 'subsampled' estimator."
            )
    call = FallbackCall(args, dict(kwargs), in_dims, out_dims, [None] * len(leaves), module.training, batch, layer.path,
                        hooks.shared, hooks.shared_sums)
    for k, o in enumerate(outs):
        if o is not None:
            o.register_hook(partial(_keep, call, k))
    if layer.calls == 0:
        hooks._touched.append(layer)
    layer.calls += 1
    layer.fired = True
    layer.pending.append((call, False, next(o for o in outs if o is not None)))


def _keep(call: FallbackCall, k: int, grad: Tensor) -> None:
    call.grads[k] = grad.detach() if call.grads[k] is None else call.grads[k] + grad.detach()


def register(hooks: Any, layer: Any) -> Any:
    """Put ``layer`` (a fallback layer) under the hooks; returns a handle with ``remove()``.

    A MultiheadAttention and an RNN/LSTM/GRU get their own rules (``dbx.estimators.attention``,
    ``dbx.estimators.recurrent``) unless a ``fallback_force`` pattern names them; everything else the
    generic forward hook."""
    from dbx.estimators import attention, recurrent
    from dbx.estimators.hooks import matches

    special = not matches(layer.path, hooks.generic_only) and layer.path not in hooks.batch_dims
    if special and attention.supports(layer.module):
        return attention.install(hooks, layer)
    if special and recurrent.supports(layer.module):
        return recurrent.install(hooks, layer)
    return layer.module.register_forward_hook(partial(forward_hook, hooks, layer), with_kwargs=True)

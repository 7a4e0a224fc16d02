"""Per-sample squared gradient norms outside training: ``per_sample_sq_norms``.

Two ways to get them, with one answer:

- ``method="hooks"``: one forward and one backward of the whole batch; layer hooks turn each
  layer's input and output gradient into squared norms (``dbx.estimators.kernels``). Fast; needs
  every measured module to be supported.
- ``method="func"``: explicit per-sample gradients with ``torch.func.vmap(grad(...))``. Works for
  any module (the reference, and dbx's test oracle), costs one per-sample gradient per sample.
- ``method="auto"``: hooks where they apply, ``torch.func`` for the other modules.

BatchNorm in training mode: with hooks, the per-sample terms are the rows of the batch gradient
(see ``dbx.estimators.exact``); ``torch.func`` cannot run a training-mode BatchNorm per sample, so
put the model in eval mode for it. The function leaves the model as it found it: parameters,
their ``.grad`` and all buffers (BatchNorm running statistics included) are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from dbx.estimators.hooks import NO_FALLBACK, ROOT, EstimatorConfigError, Fallback, build_hooks

__all__ = ["PerSampleSqNorms", "per_sample_sq_norms", "per_sample_grads_func"]


@dataclass
class PerSampleSqNorms:
    """Squared per-sample gradient norms of a batch of B samples.

    ``total`` is the (B,) float32 tensor of ``||g_i||^2`` over every measured parameter;
    ``per_layer`` maps a module path to its (B,) share (they sum to ``total``); ``grad_sum`` maps
    a parameter name to ``sum_i g_i`` (float32), so that ``total.sum() / ||grad_sum||^2`` is the
    batch's gradient diversity.
    """

    total: Tensor
    per_layer: dict[str, Tensor] = field(default_factory=dict)
    grad_sum: dict[str, Tensor] = field(default_factory=dict)

    def diversity(self) -> float:
        sq_of_sum = sum(float(g.square().sum(dtype=torch.float64)) for g in self.grad_sum.values())
        sum_sq = float(self.total.double().sum())
        if sq_of_sum > 0:
            return sum_sq / sq_of_sum
        return float("inf") if sum_sq > 0 else float("nan")


def per_sample_sq_norms(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Any,
    targets: Tensor,
    *,
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    method: str = "hooks",
    form: str = "auto",
    fallback_force: Sequence[str] = (),
    fallback_forbid: Sequence[str] = (),
) -> PerSampleSqNorms:
    """``||grad_theta loss_fn(model(x_i), y_i)||^2`` for each of the B samples of a batch.

    ``loss_fn(outputs, targets, reduction="sum")`` must be a sum of per-sample losses (as
    ``torch.nn.functional.cross_entropy`` or ``mse_loss``). ``layers``/``exclude`` are module-path
    patterns restricting the measured modules (as in the estimators' params). See the module
    docstring for ``method``. ``form`` chooses the algebra of the Linear, Conv and Embedding
    kernels ("ghost", "explicit", or "auto": the cheaper per layer); the results agree. The model
    runs in its current mode (train/eval). ``loss_fn`` may also be a loss module
    (``nn.CrossEntropyLoss()``, any module with a ``reduction`` attribute): it is called with
    ``reduction="sum"`` for the duration of the call.

    Modules without a dedicated kernel are measured by the generic per-module fallback
    (``dbx.estimators.fallback``); ``fallback_force``/``fallback_forbid`` are module-path patterns
    that send modules to it or keep them from it. With hooks, the result is self-checked
    (``dbx.estimators.selfcheck``): a model the hooks would measure wrongly raises
    ``EstimatorConfigError`` instead. An empty batch gives empty results.
    """
    if method not in ("hooks", "func", "auto"):
        raise ValueError(f"method must be 'hooks', 'func' or 'auto', got {method!r}")
    loss_fn = _sum_loss(loss_fn)
    if _batch_size(inputs) == 0:
        return _empty(model, layers, exclude)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        if method == "func":
            return _func_only(model, loss_fn, inputs, targets, layers, exclude)
        return _with_hooks(model, loss_fn, inputs, targets, layers, exclude, allow_uncovered=(method == "auto"),
                           form=form, fallback=Fallback(True, tuple(fallback_force), tuple(fallback_forbid)), selfcheck=True)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])


def _with_hooks(model, loss_fn, inputs, targets, layers, exclude, *, allow_uncovered: bool,
                form: str = "auto", estimator: str = "per_sample_sq_norms",
                fallback: Fallback = NO_FALLBACK, selfcheck: bool = False) -> PerSampleSqNorms:
    from dbx.estimators.selfcheck import SelfCheck, watched_from

    hooks, own = build_hooks(model, include=layers, exclude=exclude, estimator=estimator, form=form,
                             allow_uncovered=allow_uncovered, fallback=fallback)
    check = SelfCheck(model, watched_from(hooks), estimator=estimator, hooks=hooks)
    params = {id(p): p for layer in hooks.layers for p in layer.params}  # insertion-ordered, deduplicated
    for _, _, named in own.uncovered:
        params.update({id(p): p for _, p in named})
    names = _param_names(model)
    plist = list(params.values())
    hooks.attach()
    if selfcheck:
        check.arm()
    try:
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets, reduction="sum")
            grads = torch.autograd.grad(loss, plist, allow_unused=True)
        rows = hooks.collect()
        if selfcheck:
            check.check_sums({id(p): g for p, g in zip(plist, grads, strict=True)}, accumulated=False)
            check.check_batch_dims()
    finally:
        check.disarm()
        hooks.detach()
    n = _batch_size(inputs)
    per_layer: dict[str, Tensor] = {}
    if rows is not None:
        for layer in hooks.layers:
            per_layer[layer.key] = rows[layer.index]
    else:
        for layer in hooks.layers:
            per_layer[layer.key] = torch.zeros(n, dtype=torch.float32, device=plist[0].device)
    if own.uncovered:
        uncovered_names = list(dict.fromkeys(names[id(p)] for _, _, named in own.uncovered for _, p in named))
        per_param = per_sample_grads_func(model, loss_fn, inputs, targets, uncovered_names)
        seen: set[int] = set()  # a parameter shared by two modules counts once, with its first owner
        for path, _, named in own.uncovered:
            mine = [p for _, p in named if id(p) not in seen]
            seen.update(id(p) for p in mine)
            if mine:
                per_layer[path or ROOT] = sum(_sq_rows(per_param[names[id(p)]]) for p in mine)
    grad_sum = {names[id(p)]: (torch.zeros_like(p, dtype=torch.float32) if g is None else _at_least_f32(g.detach()))
                for p, g in zip(plist, grads, strict=True)}
    total = torch.stack(list(per_layer.values())).sum(0)
    return PerSampleSqNorms(total=total, per_layer=per_layer, grad_sum=grad_sum)


def _func_only(model, loss_fn, inputs, targets, layers, exclude) -> PerSampleSqNorms:
    from dbx.estimators.hooks import ownership

    own = ownership(model, layers, exclude)
    names = _param_names(model)
    groups: dict[str, list[str]] = {}
    seen: set[int] = set()  # a shared parameter counts once, with its first owner
    for path, _, _, params in own.covered:
        groups[path or ROOT] = [names[id(p)] for p in params if id(p) not in seen]
        seen.update(id(p) for p in params)
    for path, _, named in own.uncovered:
        groups[path or ROOT] = [names[id(p)] for _, p in named if id(p) not in seen]
        seen.update(id(p) for _, p in named)
    if not groups:
        raise EstimatorConfigError("per_sample_sq_norms: no trainable parameters selected")
    per_param = per_sample_grads_func(model, loss_fn, inputs, targets, [n for ns in groups.values() for n in ns])
    per_layer = {key: sum(_sq_rows(per_param[n]) for n in ns) for key, ns in groups.items() if ns}
    total = torch.stack(list(per_layer.values())).sum(0)
    grad_sum = {n: _at_least_f32(g.sum(0)) for n, g in per_param.items()}
    return PerSampleSqNorms(total=total, per_layer=per_layer, grad_sum=grad_sum)


def per_sample_grads_func(model: nn.Module, loss_fn: Callable[..., Tensor], inputs: Tensor, targets: Tensor,
                          names: Sequence[str] | None = None, *, chunk_size: int | None = None) -> dict[str, Tensor]:
    """Explicit per-sample gradients ``{param name: (B, *param.shape)}`` via ``torch.func``.

    The reference implementation (and test oracle): each sample's loss is differentiated on its
    own, ``vmap(grad(loss of one sample))``. BatchNorm must be in eval mode (torch.func cannot
    run training-mode BatchNorm per sample). ``names`` restricts the differentiated parameters.
    """
    from torch.func import functional_call, grad, vmap

    params = dict(model.named_parameters())
    wanted = list(names) if names is not None else [n for n, p in params.items() if p.requires_grad]
    diff = {n: params[n].detach() for n in wanted}
    fixed = {n: p.detach() for n, p in params.items() if n not in diff}
    fixed.update({n: b for n, b in model.named_buffers()})

    def one_loss(diff_params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (diff_params, fixed), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0), reduction="sum")

    per_sample = vmap(grad(one_loss), in_dims=(None, 0, 0), randomness="different", chunk_size=chunk_size)
    return per_sample(diff, inputs, targets)


def _at_least_f32(g: Tensor) -> Tensor:
    return g if g.dtype in (torch.float32, torch.float64) else g.float()


def _sq_rows(g: Tensor) -> Tensor:
    return _at_least_f32(g.flatten(1)).square().sum(1)


def _param_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, p in model.named_parameters():  # a shared parameter goes by its first name
        names.setdefault(id(p), name)
    return names


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    if isinstance(inputs, (tuple, list)):
        return _batch_size(inputs[0])
    if isinstance(inputs, dict):
        return _batch_size(next(iter(inputs.values())))
    raise TypeError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}")



def _sum_loss(loss_fn: Any) -> Callable[..., Tensor]:
    """``loss_fn`` callable as ``loss_fn(outputs, targets, reduction="sum")``: functions as they are,
    loss modules (``nn.CrossEntropyLoss()``) with their ``reduction`` set to "sum" for each call."""
    if not isinstance(loss_fn, nn.Module):
        return loss_fn
    if not hasattr(loss_fn, "reduction"):
        raise TypeError(f"loss_fn: the module {type(loss_fn).__name__} has no 'reduction' attribute, so dbx cannot "
                        f"make it a sum of per-sample losses; pass a function loss_fn(outputs, targets, reduction=...)")

    def summed(outputs: Tensor, targets: Tensor, reduction: str = "sum") -> Tensor:
        was = loss_fn.reduction
        loss_fn.reduction = reduction
        try:
            return loss_fn(outputs, targets)
        finally:
            loss_fn.reduction = was

    return summed


def _empty(model: nn.Module, layers: Sequence[str] | None, exclude: Sequence[str]) -> PerSampleSqNorms:
    """The result for a batch of no samples: empty norms, zero gradient sums."""
    from dbx.estimators.hooks import ownership

    own = ownership(model, layers, exclude, Fallback())
    names = _param_names(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    per_layer = {path or ROOT: torch.zeros(0, device=device) for path, *_ in own.covered + own.uncovered}
    grad_sum = {names[id(p)]: torch.zeros_like(p, dtype=torch.float32)
                for _, _, _, params in own.covered for p in params}
    grad_sum.update({names[id(p)]: torch.zeros_like(p, dtype=torch.float32) for _, _, named in own.uncovered for _, p in named})
    return PerSampleSqNorms(total=torch.zeros(0, device=device), per_layer=per_layer, grad_sum=grad_sum)

"""Hooks that collect per-sample squared gradient norms from a model's own backward pass.

``NormHooks`` registers, on every parameter-owning module it covers, a forward hook that keeps
the module's input (autograd keeps it alive anyway) and puts a gradient hook on the module's
output. When autograd reaches that output, the hook hands input and output gradient to the
module's kernel (``dbx.estimators.kernels``), which returns the (B,) squared norms of the
per-sample gradient of the module's parameters. ``collect()`` then returns them as one
(layers, B) tensor per forward/backward.

A module's parameters are left to the kernels only if the module is the sole owner of every one
of them and is called with a batch-first input; everything else is reported at ``attach`` (or at
the first forward) as a ``UserError`` naming the module, not silently mis-measured.

With ``fuse=True``, a call that the kernel will handle in the explicit form runs with its weight
detached (a forward pre-hook swaps in ``weight.detach()``, the forward hook puts the Parameter back
as soon as the call returns), so autograd skips that weight gradient, and the kernel adds the sum
of the per-sample gradients it computed anyway to ``weight.grad``. Training is unchanged; the
weight gradient of those layers is simply computed once instead of twice.
"""
from __future__ import annotations

import contextlib
import fnmatch
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from dbx.errors import UserError
from dbx.estimators import kernels as K

__all__ = ["NormHooks", "Layer", "ROOT", "matches", "EstimatorConfigError", "Fallback"]

#: The key of parameters owned by the model object itself (a model that *is* an ``nn.Linear``).
ROOT = "root"


def _transforms_active() -> bool:
    """Inside torch.func (vmap/grad): the hooks stay out of those per-sample computations."""
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(check()) if check is not None else False


def _no_autocast(like: Tensor) -> Any:
    """Norms in float32, whatever autocast context surrounds the hooks."""
    device = like.device.type
    if torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


class EstimatorConfigError(UserError):
    """The model cannot be measured by this estimator as configured (what, where, how to fix)."""


def claim_the_only_call(hooks: Any, layer: Any, what: str) -> None:
    """Mark ``layer`` as called in this forward; a second call is an error.

    The attention and recurrent rules measure one call per forward; a module called twice has a
    per-sample gradient summed over its calls, which only the generic fallback computes."""
    if layer.calls:
        raise EstimatorConfigError(
            f"estimator {hooks.estimator!r}: the {what} {display(layer.path)!r} is called more than once in one "
            f"forward; its per-sample gradient is the sum over the calls, which the generic fallback computes: "
            f"set estimator.params.fallback_force: [{layer.path or ROOT!r}].")
    hooks._touched.append(layer)
    layer.calls += 1
    layer.fired = True


def display(path: str) -> str:
    return path if path else "(the model itself)"


def matches(path: str, patterns: Iterable[str]) -> bool:
    """Whether a module path, or any module above it, matches one of the fnmatch ``patterns``.

    ``"fc"`` matches ``fc``; ``"layer4"`` matches ``layer4.0.conv1`` too; ``"*.bn*"`` matches
    every module whose last name starts with ``bn``.
    """
    key = path or ROOT
    for pattern in patterns:
        if pattern in ("*", "**") or fnmatch.fnmatchcase(key, pattern) or fnmatch.fnmatchcase(key, pattern + ".*"):
            return True
    return False


@dataclass(eq=False)
class Layer:
    """One parameter-owning module that the hooks measure."""

    path: str
    module: nn.Module
    kernel: K.Kernel
    index: int
    params: list[nn.Parameter]
    calls: int = 0
    fired: bool = False
    pending: list[tuple[Any, bool, Tensor]] = field(default_factory=list)
    fusable: bool = False  # may run with the weight detached, its gradient supplied by the kernel
    detached: Tensor | None = None  # the Parameter while a call runs with its weight detached
    groupable: bool = False  # held until ``collect`` and computed with layers of its shape (``grouped``)
    #: (input shape, device, code path) -> the kernel's plan for a fused call: asked once per batch shape, not every step
    plans: dict[tuple[Any, ...], str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.path or ROOT


@dataclass(frozen=True)
class Ownership:
    """The parameter-owning modules of a model, split by what the hooks can do with them."""

    covered: list[tuple[str, nn.Module, K.Kernel, list[nn.Parameter]]]
    uncovered: list[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]]
    shared: list[tuple[str, list[str]]]  # parameter name, module paths that own it
    shared_ids: set[int]
    #: shared parameters measured anyway: every module using them goes through the generic fallback,
    #: whose per-sample gradients of each use are added up before squaring
    measured_shared: frozenset[int] = frozenset()
    #: module path -> the dimension holding the samples, for modules inside a time-major
    #: (``batch_first=False``) Transformer layer: dimension 1, from the parent's semantics
    batch_dims: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Fallback:
    """Which modules the generic per-module fallback (``dbx.estimators.fallback``) measures: by default
    those without a dedicated kernel; ``force`` patterns also those with one, ``forbid`` patterns none."""

    enabled: bool = True
    force: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()


#: no generic fallback: modules without a dedicated kernel are refused (or left to the caller)
NO_FALLBACK = Fallback(enabled=False)


def ownership(model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str],
              fallback: Fallback = NO_FALLBACK) -> Ownership:
    """Walk ``model`` and sort its trainable parameters by owning module (included ones only)."""
    from dbx.estimators import fallback as FB

    owners: dict[int, list[str]] = {}
    names: dict[int, str] = {}
    covered, uncovered = [], []
    claimed: list[str] = []  # modules measured as a whole with their children (MultiheadAttention)
    time_major: list[str] = []  # Transformer layers with batch_first=False: their children see (T, B, ...)
    batch_dims: dict[str, int] = {}
    for path, module in model.named_modules(remove_duplicate=True):
        if FB.time_major_parent(module):
            time_major.append(path)
        own = [(n, p) for n, p in module._parameters.items() if p is not None and p.requires_grad]
        for n, p in own:
            owners.setdefault(id(p), []).append(path)
            names.setdefault(id(p), f"{path}.{n}" if path else n)
        if any(path.startswith(c + ".") for c in claimed):
            continue
        picked = (include is None or matches(path, include)) and not matches(path, exclude)
        if picked and fallback.enabled and FB.claims_children(module) and not matches(path, fallback.forbid):
            claimed.append(path)
            covered.append((path, module, FB.fallback_kernel(), [p for _, p in FB.fallback_params(module)]))
            continue
        if not own or not picked:
            continue
        kernel = K.kernel_for(module)
        inside = fallback.enabled and any(path.startswith(t + ".") for t in time_major)
        if inside and not matches(path, fallback.forbid):
            batch_dims[path] = 1
        if fallback.enabled and (kernel is None or matches(path, fallback.force) or path in batch_dims) and not matches(
                path, fallback.forbid):
            kernel = FB.fallback_kernel()
        if kernel is None:
            uncovered.append((path, module, own))
        else:
            covered.append((path, module, kernel, [p for _, p in own]))
    for path in claimed:  # the claimed children's parameters belong to their parent
        for n, p in model.get_submodule(path).named_parameters():
            if "." in n and id(p) in owners:
                owners[id(p)] = [path if o.startswith(path + ".") else o for o in owners[id(p)]]
    included = {path for path, *_ in covered} | {path for path, *_ in uncovered}
    shared_ids = {i for i, paths in owners.items() if len(paths) > 1 and any(p in included for p in paths)}
    handled: set[int] = set()
    if fallback.enabled and shared_ids:
        covered_paths = {path for path, *_ in covered}
        handled = {i for i in shared_ids
                   if all(o in covered_paths and not matches(o, fallback.forbid) for o in owners[i])}
        covered = [(path, module, FB.fallback_kernel(), params)
                   if any(id(p) in handled for p in params) else (path, module, kernel, params)
                   for path, module, kernel, params in covered]
        shared_ids = shared_ids - handled
    shared = [(names[i], owners[i]) for i in shared_ids]
    return Ownership(covered, uncovered, shared, shared_ids, frozenset(handled), batch_dims)


class _Reach(torch.autograd.Function):
    """Identity, in place, that puts a tensor computed without gradients on the backward path.

    A fused call whose input needs no gradient and whose only parameter is the detached weight
    (a model's first convolution, bias-free) produces an output outside autograd's graph; its
    output gradient, which the kernel needs, would never be computed. Applied to that output with
    a gradient-requiring ``anchor``, this makes the output itself (same tensor, so in-place
    activations after it still work) a node whose gradient autograd computes and discards: the
    anchor gets none.
    """

    @staticmethod
    def forward(ctx: Any, output: Tensor, anchor: Tensor) -> Tensor:
        ctx.mark_dirty(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, Tensor):
            return value
        if isinstance(value, (tuple, list)):
            for v in value:
                if isinstance(v, Tensor):
                    return v
        if isinstance(value, dict):
            for v in value.values():
                if isinstance(v, Tensor):
                    return v
    return None


class NormHooks:
    """Per-sample squared gradient norms of ``layers`` of ``model``, from its backward passes.

    Usage: ``attach()``; forward with grad enabled; backward (``.backward()`` or
    ``torch.autograd.grad``); ``collect()`` -> (len(layers), B) float32 tensor of squared norms of
    ``scale * per-sample gradient`` per layer, where ``scale`` is whatever multiplied the summed
    per-sample losses before backward; repeat; ``detach()``.

    Hooks act only when grad mode is on and the module's output requires grad, so evaluation
    under ``torch.no_grad()`` costs one Python call per module and nothing else.
    """

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module, K.Kernel, list[nn.Parameter]]],
                 *, form: str = "auto", estimator: str = "exact", fuse: bool = False, path: str = "auto") -> None:
        self.model = model
        self.form = K.check_form(form)
        self.path = K.check_path(path)  # the kernels' code path ("auto": the tensors' device type)
        self._on_path = contextlib.nullcontext if path == "auto" else partial(K.use_path, path)
        self.estimator = estimator
        self.fuse = fuse  # rules of their own (MultiheadAttention) may supply weight gradients too
        self.layers = [Layer(path, module, kernel, i, params)
                       for i, (path, module, kernel, params) in enumerate(layers)]
        for layer in self.layers:
            layer.fusable = fuse and layer.kernel.plan is not None and K._trainable(layer.module, "weight")
        self.batch: int | None = None  # leading dimension of the model's input in this forward
        self.generic_only: tuple[str, ...] = ()  # module patterns the generic fallback measures (no special rule)
        self.shared: frozenset[int] = frozenset()  # ids of shared parameters (see ``Ownership.measured_shared``)
        #: BatchNorm's per-sample weight terms from its running statistics, as the DiveBatch authors'
        #: code (BackPACK with BatchNorm in eval mode for the backward) computes them
        self.running_stats_bn = False
        self.batch_dims: dict[str, int] = {}  # see ``Ownership.batch_dims``
        self.shared_sums: dict[int, Tensor] = {}  # id -> (B, *shape) per-sample gradient summed over its uses
        self.seconds = 0.0
        self.enabled = True
        #: hold the layers' inputs and output gradients until ``collect`` and compute layers of equal
        #: shapes together (``dbx.estimators.grouped``): few large operations, for the CUDA path
        self.grouped = False
        self._queue: list[tuple[Layer, Any, Tensor, bool]] = []
        self._blocks: list[tuple[list[int], Tensor]] = []  # (layer indices, their (k, B) rows)
        self._orders: dict[tuple[int, ...], Tensor] = {}  # row order -> the permutation to layer order
        self._slots: list[Tensor | None] = [None] * len(self.layers)
        self._filled = 0
        self._touched: list[Layer] = []
        self._handles: list[Any] = []
        self._anchor = torch.zeros((), requires_grad=True)  # see ``_Reach``

    # -- lifecycle ---------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handles:
            return
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        for layer in self.layers:
            layer.groupable = self._groupable(layer)
            if layer.fusable:
                self._handles.append(layer.module.register_forward_pre_hook(partial(self._fuse_pre_hook, layer),
                                                                            with_kwargs=True))
            if layer.kernel.name == "fallback":
                from dbx.estimators.fallback import register

                self._handles.append(register(self, layer))
                continue
            self._handles.append(layer.module.register_forward_hook(
                partial(self._forward_hook, layer), with_kwargs=True, always_call=layer.fusable))
        self.reset()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._restore_weights()
        self.reset()

    def _groupable(self, layer: Layer) -> bool:
        """Convolutions and BatchNorms with the plain per-layer rule, in grouped mode: not the fallback's
        modules, not batch-second modules, no shared parameters, no running-statistics BatchNorm terms."""
        if not self.grouped or layer.kernel.name not in ("conv", "batchnorm"):
            return False
        if layer.path in self.batch_dims or matches(layer.path, self.generic_only):
            return False
        if self.running_stats_bn and layer.kernel.name == "batchnorm":
            return False
        return not any(id(p) in self.shared for p in layer.params)

    def _restore_weights(self) -> None:
        """Put back every weight detached for a call (normally done at once by the forward hook)."""
        for layer in self.layers:
            if layer.detached is not None:
                layer.module._parameters["weight"] = layer.detached
                layer.detached = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def reset(self) -> None:
        """Forget everything captured since the last ``collect``."""
        for layer in self.layers:
            layer.calls = 0
            layer.pending.clear()
        self._slots = [None] * len(self.layers)
        self._filled = 0
        self._touched = []
        self._queue = []
        self._blocks = []
        self.batch = None
        self.shared_sums = {}

    # -- hooks -------------------------------------------------------------------------------
    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not (self.enabled and torch.is_grad_enabled()) or _transforms_active():
            return
        x = _first_tensor(args, kwargs)
        if x is not None and x.dim() > 0:
            self.batch = x.shape[0]

    def _fuse_pre_hook(self, layer: Layer, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Run this call with the weight detached when the kernel will supply its gradient.

        Only for calls in the explicit form (the per-sample gradients are computed anyway). When
        nothing else of the call needs a gradient (a model's first layer without bias), the forward
        hook puts the output back on the backward path (``_Reach``).
        """
        if layer.detached is not None:  # a previous call raised before its forward hook ran
            module._parameters["weight"] = layer.detached
            layer.detached = None
        if not (self.enabled and torch.is_grad_enabled()) or _transforms_active():
            return
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, Tensor) or x.dim() == 0:
            return
        key = (x.shape, x.device, self.path if self.path != "auto" else K.path_of(x.device))
        plan = layer.plans.get(key)
        if plan is None:
            with self._on_path():
                plan = layer.plans[key] = layer.kernel.plan(module, x, self.form, fused=True)
        if plan != "explicit":
            return
        weight = module._parameters["weight"]
        layer.detached = weight
        module._parameters["weight"] = weight.detach()

    def _forward_hook(self, layer: Layer, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        fused = layer.detached is not None
        if fused:  # the Parameter goes back at once; this call's weight gradient comes from the kernel
            module._parameters["weight"] = layer.detached
            layer.detached = None
            if isinstance(output, Tensor) and not output.requires_grad and output.is_floating_point():
                _Reach.apply(output, self._anchor)  # in place: ``output`` itself now reaches the backward
        if (not (self.enabled and torch.is_grad_enabled()) or not isinstance(output, Tensor)
                or not output.requires_grad or _transforms_active()):
            return
        start = time.perf_counter()
        x = args[0] if args else next(iter(kwargs.values()))
        if self.batch is None:
            self.batch = x.shape[0] if x.dim() > 0 else None
        if self.batch == 0:  # an empty batch: no samples, no norms
            return
        if x.dim() == 0 or x.shape[0] != self.batch or output.shape[0] != self.batch:
            raise EstimatorConfigError(
                f"estimator {self.estimator!r} needs batch-first inputs: module {display(layer.path)!r} "
                f"({type(module).__name__}) received shape {tuple(x.shape)} while the model's batch has "
                f"{self.batch} samples (is the batch folded into another dimension, or time-major?). "
                f"Exclude it with estimator.params.exclude: [{layer.path or ROOT!r}], or use the "
                f"'subsampled' estimator."
            )
        if layer.calls == 0:
            self._touched.append(layer)
        layer.calls += 1
        layer.fired = True
        if self.running_stats_bn and layer.kernel.name == "batchnorm":  # the authors' BatchNorm terms
            ctx = (x, None, None)  # normalised with the running statistics, read at backward time
        else:
            ctx = layer.kernel.capture(module, x, output)
        output.register_hook(partial(self._grad_hook, layer, ctx, fused))
        self.seconds += time.perf_counter() - start

    def _grad_hook(self, layer: Layer, ctx: Any, fused: bool, grad: Tensor) -> None:
        if not self.enabled and not fused:  # a fused call's weight gradient is owed in any case
            return
        start = time.perf_counter()
        if layer.calls <= 1 and layer.groupable and self.enabled:
            self._queue.append((layer, ctx, grad, fused))  # computed with its group in ``collect``
        elif layer.calls <= 1:
            self._store(layer, self._run(layer, [ctx], [grad], [fused]))
        else:  # a module used several times in one forward: its per-sample gradient is the sum
            layer.pending.append((ctx, fused, grad))
            if len(layer.pending) == layer.calls:
                self._flush(layer)
        self.seconds += time.perf_counter() - start

    def _run(self, layer: Layer, ctxs: list, grads: list[Tensor], fused: list[bool]) -> Tensor:
        with self._on_path(), _no_autocast(grads[0]):
            return layer.kernel.sq_norms(layer.module, ctxs, grads, self.form, fused)

    def _run_queue(self) -> None:
        """The held layers, each group of equal keys in one computation (``grouped``), the rest alone."""
        from dbx.estimators import grouped as G

        queue, self._queue = self._queue, []
        groups: dict[Any, list[tuple[Layer, Any, Tensor, bool]]] = {}
        for entry in queue:
            layer, ctx, grad, fused = entry
            key = G.group_key(layer.module, ctx, grad, fused)
            groups.setdefault(key if key is not None else ("alone", layer.index), []).append(entry)
        for key, entries in groups.items():
            layer, ctx, grad, fused = entries[0]
            size = G.group_size(layer.module, ctx, grad, fused) if key[0] != "alone" else 0
            for s in range(0, len(entries), max(1, size)):
                part = entries[s:s + max(1, size)]
                if size < 1:  # too large for one computation: the per-layer kernel works in chunks
                    layer, ctx, grad, fused = part[0]
                    self._store(layer, self._run(layer, [ctx], [grad], [fused]))
                    continue
                with _no_autocast(part[0][2]):
                    rows = G.grouped_sq_norms([e[0].module for e in part], [e[1] for e in part],
                                              [e[2] for e in part], key, self.form)
                self._blocks.append(([e[0].index for e in part], rows))

    def _rows_in_layer_order(self, slots: list[Tensor | None]) -> Tensor:
        """One (layers, B) tensor from the groups' blocks and the single layers' slots (zeros for
        layers without a gradient): one concatenation and one gather, whatever the number of layers."""
        parts = [rows for _, rows in self._blocks]
        order = [i for indices, _ in self._blocks for i in indices]
        singles = [i for i, s in enumerate(slots) if s is not None]
        if singles:
            parts.append(torch.stack([slots[i] for i in singles]))
            order += singles
        if len(order) < len(slots):
            seen = set(order)
            missing = [i for i in range(len(slots)) if i not in seen]
            parts.append(parts[0].new_zeros(len(missing), parts[0].shape[1]))
            order += missing
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        key = tuple(order)
        if key == tuple(range(len(slots))):
            return rows
        inverse = self._orders.get(key)
        if inverse is None or inverse.device != rows.device:
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            inverse = self._orders[key] = inverse.to(rows.device)
        return rows.index_select(0, inverse)

    def _flush(self, layer: Layer) -> None:
        if layer.pending:
            ctxs, fused, grads = zip(*layer.pending, strict=True)
            layer.pending.clear()
            self._store(layer, self._run(layer, list(ctxs), list(grads), list(fused)))

    def _store(self, layer: Layer, norms: Tensor) -> None:
        slot = self._slots[layer.index]
        if slot is None:
            self._slots[layer.index] = norms
            self._filled += 1
        else:
            self._slots[layer.index] = slot + norms

    # -- results -----------------------------------------------------------------------------
    def collect(self) -> Tensor | None:
        """(layers, B) squared norms captured since the last call, or None if nothing was seen.

        Layers that got no gradient in this backward contribute zeros.
        """
        start = time.perf_counter()
        self._restore_weights()
        if self._queue:
            with self._on_path(), torch.no_grad():  # as the kernels run inside the backward
                self._run_queue()
        for layer in self._touched:
            if layer.pending:  # some calls' outputs got no gradient: they contributed nothing
                self._flush(layer)
            layer.calls = 0
        self._touched = []
        if self.shared_sums:  # a shared parameter's norm, from the sum of its uses, goes to its first owner
            for pid, per_sample in self.shared_sums.items():
                owner = next(layer for layer in self.layers if any(id(p) == pid for p in layer.params))
                self._store(owner, K._sq(per_sample.flatten(1), 1))
            self.shared_sums = {}
        if self._filled == 0 and not self._blocks:
            self.reset()
            return None
        slots = self._slots
        if self._blocks:
            rows = self._rows_in_layer_order(slots)
            self._blocks = []
        else:
            if self._filled < len(slots):
                ref = next(s for s in slots if s is not None)
                zero = torch.zeros_like(ref)
                slots = [zero if s is None else s for s in slots]
            rows = torch.stack(slots)
        self._slots = [None] * len(self.layers)
        self._filled = 0
        self.batch = None
        self.seconds += time.perf_counter() - start
        return rows

    def unfired(self) -> list[Layer]:
        """Layers whose parameters received a gradient although their forward hook never ran.

        That happens when a model uses a module's weights functionally (``F.linear(x, m.weight)``)
        instead of calling the module: the hooks would miss that use.
        """
        return [layer for layer in self.layers if not layer.fired and any(p.grad is not None for p in layer.params)]


def build_hooks(model: nn.Module, *, include: Sequence[str] | None, exclude: Sequence[str], estimator: str,
                form: str = "auto", allow_uncovered: bool = False, fuse: bool = False,
                fallback: Fallback = NO_FALLBACK, path: str = "auto") -> tuple[NormHooks, Ownership]:
    """Check ``model`` and build hooks for its included parameter-owning modules.

    Raises ``EstimatorConfigError`` for parameters shared between modules, for unsupported
    modules (unless ``allow_uncovered``) and when the patterns select nothing.
    """
    own = ownership(model, include, exclude, fallback)
    if own.shared and allow_uncovered:  # shared parameters go to the caller's fallback
        keep = [c for c in own.covered if not any(id(p) in own.shared_ids for p in c[3])]
        moved = [(path, module, [(n, p) for n, p in module._parameters.items() if p is not None and p.requires_grad])
                 for path, module, _, params in own.covered if any(id(p) in own.shared_ids for p in params)]
        own = Ownership(keep, own.uncovered + moved, [], set())
    if own.shared:
        listing = "; ".join(f"{name} is used by {', '.join(map(repr, map(display, paths)))}"
                            for name, paths in own.shared[:5])
        paths = sorted({p or ROOT for _, ps in own.shared for p in ps})
        raise EstimatorConfigError(
            f"estimator {estimator!r} cannot take per-sample norms of parameters shared between modules "
            f"({listing}): each module sees only its own part of the gradient. Exclude them with "
            f"estimator.params.exclude: {paths}, or use the 'subsampled' estimator."
        )
    if own.uncovered and not allow_uncovered:
        listing = ", ".join(f"{display(path)!r} ({type(m).__module__}.{type(m).__qualname__})"
                            for path, m, _ in own.uncovered[:8])
        more = f" and {len(own.uncovered) - 8} more" if len(own.uncovered) > 8 else ""
        paths = [path or ROOT for path, _, _ in own.uncovered]
        raise EstimatorConfigError(
            f"estimator {estimator!r} cannot compute per-sample gradient norms for module(s) {listing}{more}, "
            f"which have trainable parameters. Supported: {', '.join(K.supported_types())} (with their "
            f"standard forward), and parameter-free modules. Leave them out of the statistic with "
            f"estimator.params.exclude: {paths[:8]}, or use the 'subsampled' estimator, which handles any layer."
        )
    if not own.covered and not own.uncovered:
        raise EstimatorConfigError(
            f"estimator {estimator!r} found no trainable parameters to measure"
            + (f" in the layers matching {list(include)}" if include is not None else "")
            + (f" outside {list(exclude)}" if exclude else "")
            + f". Parameter-owning modules of this model: {_owner_listing(model)}"
        )
    hooks = NormHooks(model, own.covered, form=form, estimator=estimator, fuse=fuse, path=path)
    hooks.generic_only = fallback.force
    hooks.shared = own.measured_shared
    hooks.batch_dims = own.batch_dims
    return hooks, own


def _owner_listing(model: nn.Module, limit: int = 12) -> str:
    paths = [path or ROOT for path, m in model.named_modules() if any(p is not None for p in m._parameters.values())]
    shown = ", ".join(paths[:limit])
    return (shown + f", ... ({len(paths)} in all)") if len(paths) > limit else (shown or "none")

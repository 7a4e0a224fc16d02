"""The self-check that keeps ``exact`` from ever returning a wrong number.

Layer hooks see a parameter only through the calls of the module that owns it. Three things make
what they see differ from the parameter's real per-sample gradient, silently: the parameter is
also used outside its module's forward (``F.linear(x, self.fc.weight)`` beside ``self.fc(x)``, or
``nn.MultiheadAttention`` reading ``out_proj.weight`` itself), it is shared with another module, or
the module's input does not carry the samples in the dimension the kernel assumes (a time-major
``(T, B, d)`` input whose T happens to equal B). On the first backward of every measuring epoch
(and in every ``per_sample_sq_norms`` call) two checks rule them out:

1. **Sums.** For every measured module, the gradient of its own parameters is recomputed from the
   inputs and output gradients recorded during that step, call by call (``torch.func.vjp`` of the
   module alone, with the random state of the original call so that dropout repeats itself).
   That is the sum over samples of the per-sample gradients the hooks attribute to the module
   (S2's terms). It must equal what autograd put in ``.grad`` for the step; a parameter that got
   a gradient although its module was never called fails the same way. With fused weight
   gradients the kernel itself writes ``.grad`` for some weights, so the same comparison checks
   the fused sums against an independent reference.
2. **Batch dimension.** Sums cannot tell which samples a gradient belongs to. The model is run
   twice more without gradients, in eval mode (no dropout, running statistics), on the batch and
   on the batch with its samples rotated by one; every measured module's input must rotate along
   the dimension its kernel reads as the batch (0, or the module's own ``batch_first`` semantics
   for recurrent and attention layers). An input that rotates along another dimension, or not at
   all, is reported.

A failure is an ``EstimatorConfigError`` (a user error, exit code 2): it names the parameter, the
module, the relative difference, the likely cause and the ways out. An input modified in place
after its module ran (what the kernels read at backward time) is reported the same way. The cost
is paid once per measuring epoch, on its first step: about two to three plain training steps for
ResNet-18 or a GPT block, and 8 to 16 for tiny models (logreg, a small MLP or CNN), whose plain steps
cost little against its extra forwards (``benchmarks/estimators.py`` prints exact's first step,
which carries it, on a line of its own).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from dbx.estimators.hooks import ROOT, EstimatorConfigError, display

__all__ = ["SelfCheck", "Watched", "SUM_TOLERANCE"]

#: relative difference between the hooks' sum and autograd's gradient beyond which the check fails
#: (float32 sums differ by 1e-6 to 1e-3 where gradients cancel; the silent errors it exists for are 10-90%;
#: low-precision autocast steps get ``LOW_PRECISION_TOLERANCE``)
SUM_TOLERANCE = 1e-2
LOW_PRECISION_TOLERANCE = 3e-2
#: differences are measured against at least this fraction of the whole model's scale
NOISE_FLOOR = 1e-4


def _transforms_active() -> bool:
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(check()) if check is not None else False


@dataclass(eq=False)
class Watched:
    """One measured module: its path, its parameters (name -> Parameter) and where its inputs keep
    the batch (``input_batch_dims(module, args, kwargs)`` -> a pytree of ints or None like
    ``(args, kwargs)``)."""

    path: str
    module: nn.Module
    params: dict[str, nn.Parameter]
    input_batch_dims: Callable[[nn.Module, tuple, dict], Any]
    calls: list["_Call"] = field(default_factory=list)
    probe: list[list[tuple[Tensor, int]]] = field(default_factory=list)
    layer: Any = None  # the hooks' ``Layer``
    eager: dict[str, Tensor] = field(default_factory=dict)  # gradient sums computed during the backward
    #: an input of a call was modified in place after it: the kernels and the fallback, which read
    #: the input at backward time, would measure the modified values (an error)
    unverifiable: bool = False


@dataclass(eq=False)
class _Call:
    args: tuple
    kwargs: dict
    rng: Tensor | None
    rng_device: Any
    autocast: tuple[str, torch.dtype] | None
    grads: list[Tensor | None]
    versions: list[int] = field(default_factory=list)  # of the input tensors, to notice in-place changes

    def changed(self) -> bool:
        """Whether an input was modified in place after the call (its recomputation would differ)."""
        leaves = [v for v in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(v, Tensor)]
        return [v._version for v in leaves] != self.versions


class SelfCheck:
    """Records one step of ``watched`` modules and checks it (see the module docstring).

    ``arm()`` before the step's forward; after its backward ``check_sums(grads)`` with the
    parameters' gradients of that step, and ``check_batch_dims()``; ``disarm()`` removes every hook.
    """

    def __init__(self, model: nn.Module, watched: Sequence[Watched], *, estimator: str, hooks: Any = None) -> None:
        self.model = model
        self.hooks = hooks  # paused (``enabled = False``) during the check's own forwards
        self.watched = list(watched)
        self.estimator = estimator
        self.inputs: tuple[tuple, dict] | None = None
        self.grad_before: dict[int, Tensor | None] = {}
        self.seconds = 0.0
        self._handles: list[Any] = []
        self._mode = "off"  # "record": keep calls and output gradients; "probe": keep batch-dim inputs

    # -- lifecycle ---------------------------------------------------------------------------
    def arm(self) -> None:
        if self._handles:
            return
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        for w in self.watched:
            self._handles.append(w.module.register_forward_pre_hook(partial(self._pre_hook, w), with_kwargs=True))
            self._handles.append(w.module.register_forward_hook(partial(self._hook, w), with_kwargs=True))
        self._mode = "record"

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._mode = "off"
        self.inputs = None
        self.grad_before = {}
        for w in self.watched:
            w.calls.clear()
            w.probe.clear()
            w.eager.clear()
            w.unverifiable = False

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    @property
    def recorded(self) -> bool:
        """Whether a forward was recorded since ``arm``."""
        return self.inputs is not None

    # -- hooks -------------------------------------------------------------------------------
    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._mode != "record" or not torch.is_grad_enabled() or _transforms_active() or self.inputs is not None:
            return
        self.inputs = (args, dict(kwargs))
        self.grad_before = {id(p): (None if p.grad is None else p.grad.detach().clone())
                            for w in self.watched for p in w.params.values()}

    def _pre_hook(self, w: Watched, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._mode != "record" or not torch.is_grad_enabled() or _transforms_active():
            return
        device = _device_of(args, kwargs)
        rng = (torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda"
               else torch.get_rng_state())
        cast = None
        if device is not None and torch.is_autocast_enabled(device.type):
            cast = (device.type, torch.get_autocast_dtype(device.type))
        versions = [v._version for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, Tensor)]
        w.calls.append(_Call(args, dict(kwargs), rng, device, cast, [], versions))

    def _hook(self, w: Watched, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if _transforms_active():
            return
        if self._mode == "probe":
            dims = pytree.tree_leaves(w.input_batch_dims(module, args, kwargs), is_leaf=lambda x: x is None)
            leaves = pytree.tree_leaves((args, kwargs))
            w.probe.append([(leaf.detach(), d) for leaf, d in zip(leaves, dims, strict=False)
                            if isinstance(leaf, Tensor) and isinstance(d, int)])
            return
        if self._mode != "record" or not torch.is_grad_enabled() or not w.calls:
            return
        call = w.calls[-1]
        outs = pytree.tree_leaves(output)
        call.grads = [None] * len(outs)
        for k, o in enumerate(outs):
            if isinstance(o, Tensor) and o.requires_grad:
                o.register_hook(partial(self._on_grad, w, call, k))

    # -- check 1: sums ------------------------------------------------------------------------
    def check_sums(self, grads: dict[int, Tensor | None], *, accumulated: bool = True) -> None:
        """Compare, per parameter, the gradient of the recorded calls with ``grads`` (id -> gradient
        of this step, in the step's loss scale; ``accumulated``: they are ``.grad``, which may hold
        gradients from before the step). Raises ``EstimatorConfigError`` on a mismatch."""
        start = time.perf_counter()
        mine: dict[int, Tensor] = {}  # a parameter used by several measured modules: the sum of their parts
        owner: dict[int, tuple[Watched, str]] = {}
        for w in self.watched:
            local = {n: g.detach() for n, g in self._local_grads(w).items()}
            if w.unverifiable:
                raise EstimatorConfigError(
                    f"estimator {self.estimator!r} self-check: an input of module {display(w.path)!r} "
                    f"({type(w.module).__name__}) was modified in place after the module ran (e.g. h.mul_(...) on a "
                    f"tensor the module received), so its per-sample gradients would be computed from the modified "
                    f"values. Fix: make that operation out of place, leave the module out with "
                    f"estimator.params.exclude: [{w.path or ROOT!r}], or use the 'subsampled' estimator."
                )
            for name, p in w.params.items():
                owner.setdefault(id(p), (w, name))
                if name in local:
                    mine[id(p)] = local[name] if id(p) not in mine else mine[id(p)] + local[name]
        # a floor under each parameter's scale: a gradient that is rounding noise next to the whole
        # model's (a weight a normalisation makes scale-invariant) cannot change the statistic
        floor = NOISE_FLOOR * math.sqrt(sum(float(g.detach().double().square().sum()) for g in grads.values()
                                            if g is not None and torch.isfinite(g).all()))
        for pid, (w, name) in owner.items():
            got = grads.get(pid)
            got = got.detach() if got is not None else None
            before = self.grad_before.get(pid) if accumulated else None
            if got is not None and before is not None:
                got = got - before
            if got is None or not torch.isfinite(got).all():
                continue  # no gradient this step (or an overflowed fp16 step): nothing to compare
            ref = float(got.double().norm())
            if pid not in mine:
                if ref > 0:
                    self._fail_unseen(w, name)
                continue
            diff = float((mine[pid].double() - got.double()).norm())
            scale = max(ref, float(mine[pid].double().norm()), floor)
            tol = LOW_PRECISION_TOLERANCE if any(c.autocast for c in w.calls) else SUM_TOLERANCE
            if scale > 0 and diff > tol * scale:
                self._fail_sum(w, name, diff / scale)
        self.seconds += time.perf_counter() - start

    def check_fused_norms(self, rows: Tensor | None) -> None:
        """For layers whose weight gradient the kernel supplied (fused, explicit form), compare the
        step's per-sample norms ``rows`` (layers, B) with the unfused Gram form of the same calls."""
        if rows is None:
            return
        start = time.perf_counter()
        floor = NOISE_FLOOR * float(rows.detach().double().sum(0).norm())  # as in ``check_sums``
        with torch.no_grad():
            for w in self.watched:
                layer = w.layer
                if layer is None or not getattr(layer, "fusable", False) or not w.calls:
                    continue
                calls = [c for c in w.calls if c.grads and c.grads[0] is not None]
                if not calls:
                    continue
                xs = [c.args[0] if c.args else next(iter(c.kwargs.values())) for c in calls]
                reference = layer.kernel.sq_norms(w.module, xs, [c.grads[0] for c in calls], "ghost",
                                                  [False] * len(calls))
                got = rows[layer.index]
                scale = max(float(reference.double().norm()), floor)
                diff = float((got.double() - reference.double()).norm())
                if scale > 0 and diff > SUM_TOLERANCE * scale:
                    raise EstimatorConfigError(
                        f"estimator {self.estimator!r} self-check: the per-sample norms of module {display(w.path)!r} "
                        f"({type(w.module).__name__}) from the fused weight-gradient path differ from the unfused "
                        f"Gram form by {diff / scale:.3g} (relative). Set estimator.params.fuse_weight_grads: false, "
                        f"and please report this model."
                    )
        self.seconds += time.perf_counter() - start

    def _local_grads(self, w: Watched) -> dict[str, Tensor]:
        """Sum over the recorded calls of ``w`` of the gradient of its own parameters: the parts
        computed as the output gradients arrived (``_on_grad``), and those of calls whose gradients
        were kept (fused layers, or where that failed)."""
        total = dict(w.eager)
        for call in w.calls:
            if not any(g is not None for g in call.grads):
                continue
            if call.changed():
                w.unverifiable = True
                continue
            for n, g in self._vjp_of(w, call, call.grads).items():
                total[n] = g if n not in total else total[n] + g
        return total

    def _vjp_of(self, w: Watched, call: "_Call", grads: list[Tensor | None]) -> dict[str, Tensor]:
        """The vjp of the module alone, at the call's inputs (random state and autocast as they were),
        with ``grads`` for its output leaves (None: no gradient)."""
        from torch.func import functional_call, vjp

        fixed = {n: p.detach() for n, p in w.module.named_parameters() if n not in w.params}

        def run(params: dict[str, Tensor]) -> list[Tensor]:
            buffers = {n: b.detach().clone() for n, b in w.module.named_buffers()}  # updated in place by BN
            out = functional_call(w.module, (params, fixed, buffers), call.args, call.kwargs)
            leaves = pytree.tree_leaves(out)
            return [leaf for leaf, g in zip(leaves, grads, strict=False) if g is not None]

        primals = {n: p.detach() for n, p in w.params.items()}
        with torch.random.fork_rng(devices=[call.rng_device] if _is_cuda(call.rng_device) else []):
            if _is_cuda(call.rng_device):
                torch.cuda.set_rng_state(call.rng, call.rng_device)
            else:
                torch.set_rng_state(call.rng)
            if call.autocast is not None:
                with torch.autocast(call.autocast[0], dtype=call.autocast[1]):
                    outs, pull = vjp(run, primals)
            else:
                outs, pull = vjp(run, primals)
        cotangents = [g.to(o.dtype) for o, g in zip(outs, [g for g in grads if g is not None], strict=True)]
        (pulled,) = pull(cotangents)
        return {n: g.detach() for n, g in pulled.items()}

    def _on_grad(self, w: Watched, call: "_Call", k: int, grad: Tensor) -> None:
        """An output gradient of a recorded call: its share of the module's gradient at once (the vjp
        is linear in the output gradients), so that no output gradient is kept past its use; fused
        layers keep theirs for ``check_fused_norms``."""
        start = time.perf_counter()
        if call.changed():
            w.unverifiable = True
            return
        kept = w.layer is not None and getattr(w.layer, "fusable", False)
        if not kept:
            try:
                only = [grad if j == k else None for j in range(len(call.grads))]
                for n, g in self._vjp_of(w, call, only).items():
                    w.eager[n] = g if n not in w.eager else w.eager[n] + g
                self.seconds += time.perf_counter() - start
                return
            except Exception:  # noqa: BLE001 - kept, and recomputed (and reported) at check time
                pass
        call.grads[k] = grad.detach() if call.grads[k] is None else call.grads[k] + grad.detach()
        self.seconds += time.perf_counter() - start

    def _fail_unseen(self, w: Watched, name: str) -> None:
        where = display(w.path)
        parent = _parent_hint(self.model, w.path)
        raise EstimatorConfigError(
            f"estimator {self.estimator!r} self-check: parameter {_qual(w.path, name)!r} received a gradient "
            f"although its module {where!r} ({type(w.module).__name__}) was never called in the forward"
            f"{parent}: the model uses its weights directly (e.g. F.linear(x, m.weight)), so the hooks cannot "
            f"see its per-sample gradients. Leave it out with estimator.params.exclude: [{w.path or ROOT!r}]"
            f"{', measure its parent instead' if parent else ''}, or use the 'subsampled' estimator."
        )

    def _fail_sum(self, w: Watched, name: str, rel: float) -> None:
        raise EstimatorConfigError(
            f"estimator {self.estimator!r} self-check: for parameter {_qual(w.path, name)!r} of module "
            f"{display(w.path)!r} ({type(w.module).__name__}) the sum of the per-sample gradients the hooks "
            f"measured differs from autograd's gradient by {rel:.3g} (relative), so its per-sample norms "
            f"would be wrong. Likely cause: the parameter is also used outside its module's forward (e.g. "
            f"F.linear(x, module.weight) beside a call of the module) or is "
            f"shared with another module. Fix: leave the module out with estimator.params.exclude: "
            f"[{w.path or ROOT!r}] (or restrict estimator.params.layers), or use the 'subsampled' estimator."
        )

    # -- check 2: batch dimension ---------------------------------------------------------------
    def check_batch_dims(self) -> None:
        """Rotate the recorded step's samples and check that every measured module's input rotates
        along its batch dimension (two forwards in eval mode; run after the other checks, it frees
        the recorded calls first)."""
        if self.inputs is None:
            return
        for w in self.watched:  # the recorded calls' inputs are no longer needed: free them first
            w.calls.clear()
        args, kwargs = self.inputs
        batch = _leading_size(args, kwargs)
        if batch is None or batch < 2:
            return
        start = time.perf_counter()
        perm = torch.roll(torch.arange(batch), -1)
        rolled = pytree.tree_map(lambda t: t[perm.to(t.device)] if _batched(t, batch) else t, (args, kwargs))
        modes = {m: m.training for m in self.model.modules()}
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        self._mode = "probe"
        paused = self.hooks is not None and self.hooks.enabled
        if paused:
            self.hooks.enabled = False
        try:
            self.model.eval()
            # with grad mode on (nothing is kept: the outputs are dropped), so that fast inference paths
            # (TransformerEncoderLayer's, MultiheadAttention's) do not bypass the modules' calls
            with torch.enable_grad(), torch.random.fork_rng(devices=[]):
                for w in self.watched:
                    w.probe.clear()
                self.model(*args, **kwargs)
                first = [list(w.probe) for w in self.watched]
                for w in self.watched:
                    w.probe.clear()
                self.model(*rolled[0], **rolled[1])
                second = [list(w.probe) for w in self.watched]
        finally:
            self._mode = "record"
            if paused:
                self.hooks.enabled = True
            for m, mode in modes.items():
                m.training = mode
            with torch.no_grad():
                for n, b in self.model.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n])
        for w, calls_a, calls_b in zip(self.watched, first, second, strict=True):
            for call_a, call_b in zip(calls_a, calls_b, strict=False):
                for (a, dim), (b, _) in zip(call_a, call_b, strict=False):
                    if a.dim() <= dim or a.shape[dim] != batch or a.shape != b.shape:
                        self._fail_batch(w, tuple(a.shape), dim, batch)
                    if not _close(a.index_select(dim, perm.to(a.device)), b):
                        self._fail_batch(w, tuple(a.shape), dim, batch)
        self.seconds += time.perf_counter() - start

    def _fail_batch(self, w: Watched, shape: tuple, dim: int, batch: int) -> None:
        raise EstimatorConfigError(
            f"estimator {self.estimator!r} self-check: module {display(w.path)!r} ({type(w.module).__name__}) "
            f"receives an input of shape {shape} whose dimension {dim} does not follow the model's {batch} "
            f"samples: reordering the samples of the model's input does not reorder that dimension (the batch "
            f"is not in dimension {dim}, e.g. a time-major (T, B, ...) input, even when T == B, or a tensor "
            f"shared by all samples), so its per-sample gradients would be attributed to the wrong samples. "
            f"Fix: give it a batch-first input, leave it out with estimator.params.exclude: [{w.path or ROOT!r}], "
            f"or use the 'subsampled' estimator."
        )


def _qual(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _parent_hint(model: nn.Module, path: str) -> str:
    if "." not in path:
        return ""
    parent = model.get_submodule(path.rsplit(".", 1)[0])
    if isinstance(parent, nn.MultiheadAttention):
        return (f" (its parent {path.rsplit('.', 1)[0]!r}, an nn.MultiheadAttention, reads {path.rsplit('.', 1)[1]}'s "
                f"weights itself: measure the MultiheadAttention module as a whole, e.g. "
                f"estimator.params.layers: ['{path.rsplit('.', 1)[0]}'])")
    return ""


def _device_of(args: tuple, kwargs: dict) -> torch.device | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, Tensor):
            return leaf.device
    return None


def _is_cuda(device: Any) -> bool:
    return device is not None and getattr(device, "type", None) == "cuda"


def _leading_size(args: tuple, kwargs: dict) -> int | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None


def _batched(t: Any, batch: int) -> bool:
    return isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch


def _close(a: Tensor, b: Tensor) -> bool:
    if torch.equal(a, b):  # the usual case for a model's first layers (their input is the data): one pass
        return True
    if not a.is_floating_point():
        return False
    scale = float(a.abs().max()) if a.numel() else 0.0
    return bool(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5 * max(scale, 1e-30)))


def watched_from(hooks: Any) -> list[Watched]:
    """The measured modules of ``NormHooks`` (``dbx.estimators.hooks``), as the self-check sees them."""
    from dbx.estimators.fallback import FALLBACK, fallback_params, input_batch_dims

    watched = []
    for layer in hooks.layers:
        if layer.kernel.name == FALLBACK:
            named = dict(fallback_params(layer.module))
        else:
            ids = {id(p) for p in layer.params}
            named = {n: p for n, p in layer.module._parameters.items() if p is not None and id(p) in ids}
        dims = partial(input_batch_dims, batch_dim=hooks.batch_dims.get(layer.path))
        watched.append(Watched(layer.path, layer.module, named, dims, layer=layer))
    return watched

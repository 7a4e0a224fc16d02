"""``exact``: gradient diversity over every sample of the measuring epoch, from its own steps.

DiveBatch (Chen, Wang, Sundaram, arXiv 2509.16173; docs/algorithm.md) measures, during the epoch that
ends at a resize point,

    diversity = S1 / ||S2||^2,   S1 = sum_i ||g_i||^2,   S2 = sum_i g_i,

over the per-sample loss gradients g_i of that epoch's training steps (the weights move while the
statistic is gathered; weight decay is not part of g_i). This estimator takes ``||g_i||^2`` from
the step's own backward through layer hooks (``dbx.estimators.kernels``: no extra forward or
backward, no per-sample gradient materialised where the algebra avoids it) and ``S2`` from the
parameters' ``.grad`` once per optimizer step. Both stay on the device until ``estimate``.

BatchNorm in training mode couples the samples of a batch, so "the gradient of sample i" is not
unique. dbx takes as per-sample term the row of the batch gradient that belongs to sample i: the
output gradient autograd delivers to sample i's rows (cross-sample terms through the batch
statistics included) times sample i's own input, and for BatchNorm's affine parameters
``sum b_i * xhat_i`` with the *batch*-normalised input. These terms sum exactly to the batch
gradient, so S2 is consistent with S1. They are not the gradients of independent single-sample
forwards; models without BatchNorm (or with it in eval mode) have no such ambiguity. This is not
what the DiveBatch authors' code does (BackPACK with BatchNorm switched to eval mode for the
backward: running statistics in the weight terms, which then do not add up to S2);
``weighting: authors`` reproduces their computation.

Every module is measured by a dedicated kernel (``dbx.estimators.kernels``), by the rule for
``nn.MultiheadAttention`` (``dbx.estimators.attention``), by the rule for recurrent layers
(``dbx.estimators.recurrent``) or by the generic per-module fallback
(``dbx.estimators.fallback``), and the first step of every measuring epoch is self-checked
(``dbx.estimators.selfcheck``): a model the hooks would measure wrongly is an error, never a number.

Under torchrun (DDP) each rank adds the norms of its own samples, and ``estimate`` sums the
per-layer totals over the ranks with one all-reduce; ``S2`` is read from ``.grad`` after DDP's
all-reduce, so it is the whole global batch's. Without BatchNorm the value is the one a single
process computes over the same global batches. With BatchNorm the batch statistics are each
rank's share's (unless ``model.sync_batchnorm``, which this estimator's hooks do not support), so
the per-sample terms are those of the per-rank batches.

Micro-batching and the loss reduction are handled exactly: a micro-batch's backward carries
``loss_scale * sum_i loss_i``, so the hooks' norms are divided by ``loss_scale**2`` and the summed
gradient by ``loss_scale``; the result is the same whatever the split.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Literal, Sequence

from dbx.protocols import DiversityEstimate

__all__ = ["ExactEstimator", "WEIGHTINGS"]

#: ``weighting``: "dbx" (every sample's own loss gradient, batch-statistics BatchNorm terms) or
#: "authors" (the DiveBatch authors' computation: see ``ExactEstimator``)
WEIGHTINGS = ("dbx", "authors")

#: steps whose sums wait before ``ExactEstimator._fold`` adds them (bounded: each is a (layers,) tensor)
FOLD_STEPS = 64


class ExactEstimator:
    """Exact per-sample gradient diversity over a measuring epoch (online, from the training steps).

    Parameters (``estimator.params`` in a spec):

    - ``exclude``: module paths (fnmatch patterns; a pattern also covers the modules below it,
      e.g. ``["encoder.rnn"]`` or ``["*.attn"]``) whose parameters are left out of both sums.
      Use it for modules the hooks do not support, or reach for the ``subsampled`` estimator.
    - ``per_layer``: also report the diversity of each parameter-owning module, keyed by its path
      (the ``layerwise`` estimator always does).
    - ``fuse_weight_grads``: for layers whose per-sample gradients are computed explicitly (wide
      convolutions such as a ResNet's first stage), add their sum to the weight's ``.grad``
      instead of letting autograd compute the same batch gradient a second time: that call runs
      with the weight detached (put back as soon as the call returns), and the kernel accumulates
      the gradient exactly as autograd would. It saves about one weight-gradient computation per
      such layer; training is unchanged. Off automatically under ``torch.distributed`` (whose
      gradient hooks expect autograd to produce every gradient); turn it off for
      ``create_graph=True`` backwards (higher-order gradients).
    - ``kernel_path``: ``"auto"`` (default) lays the per-sample computations out for the device the
      model is on; ``"cpu"`` or ``"cuda"`` forces that device's layout whatever the device (same
      numbers: it is how the CUDA layout, few large operations, is tested and counted on a CPU).
    - ``fallback`` (default true), ``fallback_force``, ``fallback_forbid``: the generic per-module
      fallback measures modules without a dedicated kernel (per-sample gradients of that module
      alone through ``torch.func``, from its inputs and output gradients recorded in the step);
      ``fallback_force`` module-path patterns send modules with a kernel to it as well (a
      MultiheadAttention matching one uses the generic fallback instead of its own rule),
      ``fallback_forbid`` patterns keep modules from it (they are then refused by name).
    - ``weighting``: ``dbx`` (default): every sample's own loss gradient, whatever the size of its
      batch, and BatchNorm terms from the batch statistics. ``authors``: the DiveBatch authors'
      computation: per-sample gradients of each step's *mean* loss (a sample weighs one over its
      step's samples, so a short last batch counts more) and BatchNorm weight terms normalised with
      the running statistics; S2 is the sum of the steps' mean-loss gradients.

    Dedicated kernels: Linear (any leading dimensions), Conv1d, Conv2d (any stride, padding,
    padding mode, dilation, groups), BatchNorm1d/2d/3d, GroupNorm, LayerNorm, RMSNorm, InstanceNorm
    (affine), Embedding (dense, without ``scale_grad_by_freq``); MultiheadAttention (``out_proj``
    included) and RNN/LSTM/GRU (``batch_first`` either way) have rules of their own; Conv3d,
    ConvTranspose, EmbeddingBag, PReLU, Bilinear and user layers go through the fallback, as do all uses of a
    parameter shared by several modules (a tied LM head), whose per-sample gradients are added
    before squaring. Refused by name: modules that couple samples (BatchNorm in training mode inside
    a fallback module, dropout the fallback cannot repeat, ``scale_grad_by_freq``, packed
    sequences). Between ``attach`` and ``detach`` every backward through the model must be reported
    with ``on_backward``.
    """

    name = "exact"

    def __init__(self, *, exclude: Sequence[str] = (), per_layer: bool = False, fuse_weight_grads: bool = True,
                 fallback: bool = True, fallback_force: Sequence[str] = (), fallback_forbid: Sequence[str] = (),
                 weighting: Literal["dbx", "authors"] = "dbx", kernel_path: Literal["auto", "cpu", "cuda"] = "auto") -> None:
        from dbx.estimators.kernels import PATHS

        if weighting not in WEIGHTINGS:
            raise ValueError(f"estimator.params.weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        if kernel_path not in PATHS:
            raise ValueError(f"estimator.params.kernel_path must be one of {list(PATHS)}, got {kernel_path!r}")
        self.weighting = weighting
        self.kernel_path = kernel_path
        self.exclude = _patterns(exclude)
        self.per_layer = per_layer
        self.fuse_weight_grads = fuse_weight_grads
        self.fallback = fallback
        self.fallback_force = _patterns(fallback_force)
        self.fallback_forbid = _patterns(fallback_forbid)
        self._include: Sequence[str] | None = None
        self._hooks: Any = None
        self._selfcheck: Any = None
        self._incoming: Any = None  # under DDP, this rank's own gradients of the self-checked step
        self._reset_sums()

    def _reset_sums(self) -> None:
        self._sum_sq = None  # (layers,) float64: sum over samples of per-layer ||g_i||^2
        self._step_parts: list[tuple[Any, Any]] = []  # this step's (row sums, loss_scale) per backward
        self._step_samples = 0
        self._waiting: list[Any] = []  # steps' (layers,) sums not yet added to ``_sum_sq`` (``_fold``)
        self._divisors: list[float] = []  # what each waiting sum is still to be divided by
        self._counts: list[int] = []  # each waiting step's samples
        self._finite: Any = None  # 0-d bool: whether the last step added at once had finite norms
        self._sum_grad: list[Any] = []  # float32 copies of the parameters: sum over samples of g_i
        self._samples = None  # 0-d int64 on the device: samples of the steps counted
        self._seconds = 0.0
        self._checked = False

    # -- the contract --------------------------------------------------------------------------
    def attach(self, model: Any) -> None:
        import torch

        from dbx.estimators.hooks import Fallback, build_hooks
        from dbx.estimators.selfcheck import SelfCheck, watched_from

        start = time.perf_counter()
        if self._hooks is not None:
            self.detach()
        fuse = self.fuse_weight_grads and not _distributed()
        fallback = Fallback(self.fallback, self.fallback_force, self.fallback_forbid)
        hooks, _ = build_hooks(model, include=self._include, exclude=self.exclude, estimator=self.name, fuse=fuse,
                               fallback=fallback, path=self.kernel_path)
        hooks.running_stats_bn = self.weighting == "authors"
        hooks.grouped = _grouped(self.kernel_path, model)
        self._hooks = hooks
        self._selfcheck = SelfCheck(model, watched_from(hooks), estimator=self.name, hooks=hooks)
        first: dict[int, tuple[Any, int]] = {}  # a shared parameter counts once, with its first owner
        for layer in hooks.layers:
            for p in layer.params:
                first.setdefault(id(p), (p, layer.index))
        self._params = [p for p, _ in first.values()]
        self._layer_of_param = [index for _, index in first.values()]
        self._reset_sums()
        device = self._params[0].device
        self._sum_sq = torch.zeros(len(hooks.layers), dtype=torch.float64, device=device)
        self._samples = torch.zeros((), dtype=torch.long, device=device)
        self._sum_grad = [torch.zeros_like(p, dtype=torch.float32) for p in self._params]
        hooks.attach()
        self._selfcheck.arm()  # records the first step, checked in its on_backward
        self._incoming = _Incoming(self._params) if _distributed() else None
        self._seconds = time.perf_counter() - start

    def on_backward(self, loss_scale: Any) -> None:
        import torch

        hooks = self._hooks
        if hooks is None:
            return
        batch = hooks.batch
        start = time.perf_counter()
        rows = hooks.collect()  # (layers, B): squared norms of loss_scale * g_i
        if rows is not None:  # divided by loss_scale**2 in ``on_step`` (a single backward: in ``_fold``)
            self._step_parts.append((rows.sum(1, dtype=torch.float64), loss_scale))
            self._step_samples += batch if batch is not None else rows.shape[1]
        check = self._selfcheck
        if check is not None and check.recorded:
            try:
                if self._incoming is not None:  # under DDP .grad is every rank's sum: compare this rank's own
                    grads, self._incoming = self._incoming.release(), None
                    check.check_sums(grads, accumulated=False)
                else:
                    check.check_sums({id(p): p.grad for p in self._params})
                check.check_fused_norms(rows)
                check.check_batch_dims()
            finally:
                check.disarm()
                self._selfcheck = None
        self._seconds += time.perf_counter() - start

    def on_step(self, loss_scale: Any) -> None:
        """Add the step to both sums, unless its norms are not finite (an fp16 step whose gradients
        overflowed, which the GradScaler skips, or a step skipped for a non-finite loss): that is
        decided on the device, without waiting for it. With a tensor ``loss_scale`` (a GradScaler's
        scale) the summed gradient is masked the same way; a float scale means a step that reaches
        here with finite norms has finite gradients, and the sum takes the fast path."""
        import torch

        if self._hooks is None:
            return
        start = time.perf_counter()
        if not self._checked:
            self._check_hooks_saw_all_uses()
        parts, self._step_parts = self._step_parts, []
        if isinstance(loss_scale, torch.Tensor) or self.weighting != "dbx":
            loss_scale = self._add_step_now(parts, loss_scale)
        else:  # the plain step: its sums wait, to be masked and added many steps at a time
            if len(parts) == 1:
                self._waiting.append(parts[0][0])
                self._divisors.append(parts[0][1] * parts[0][1])
            elif parts:  # micro-batches: each one's sum divided first, as the sums were always formed
                self._waiting.append(self._step_sum(parts))
                self._divisors.append(1.0)
            if parts:
                self._counts.append(self._step_samples)
            self._step_samples = 0
            if len(self._waiting) >= FOLD_STEPS:
                self._fold()
        sums, grads = self._sum_grad, [p.grad for p in self._params]
        if any(g is None for g in grads):  # parameters that took no part in this step
            pairs = [(s, g) for s, g in zip(sums, grads, strict=True) if g is not None]
            sums, grads = [s for s, _ in pairs], [g for _, g in pairs]
        if grads and isinstance(loss_scale, torch.Tensor):
            finite = self._finite
            for total, grad in zip(sums, grads, strict=True):
                total.add_(torch.where(finite, grad / loss_scale, 0.0))
        elif grads:
            torch._foreach_add_(sums, grads, alpha=1.0 / loss_scale)
        self._seconds += time.perf_counter() - start

    @staticmethod
    def _step_sum(parts: list[tuple[Any, Any]]) -> Any:
        """A step's (layers,) sums: each backward's row sums over its loss_scale**2, added up."""
        total = None
        for rows, scale in parts:
            part = rows / (scale * scale)
            total = part if total is None else total.add_(part)
        return total

    def _add_step_now(self, parts: list[tuple[Any, Any]], loss_scale: Any) -> Any:
        """A step with a GradScaler's scale (its summed gradient is masked with the same flag) or the
        authors' weighting: masked and added at once. Returns the scale of the step's summed gradient."""
        import torch

        step_sq = self._step_sum(parts) if parts else torch.zeros_like(self._sum_sq)
        finite = torch.isfinite(step_sq).all()
        if self.weighting == "authors" and self._step_samples:
            # the authors' statistic is of the step's mean loss: sample i weighs 1 / (its step's samples)
            step_sq = step_sq / float(self._step_samples) ** 2
            loss_scale = loss_scale * self._step_samples
        self._sum_sq.add_(torch.where(finite, step_sq, 0.0))
        self._samples.add_(finite.long() * self._step_samples)
        self._step_samples = 0
        self._finite = finite
        return loss_scale

    def _fold(self) -> None:
        """Add the waiting steps' sums to ``_sum_sq``, each step left out if any of its sums is not
        finite (a skipped step), in a handful of operations instead of a dozen per step. The result
        is the one of adding them one by one: the same divisions, and on the CPU a cumulative sum
        along the steps adds them in order (elsewhere they are added one by one)."""
        import torch

        if not self._waiting:
            return
        device = self._sum_sq.device
        steps = torch.stack(self._waiting)
        steps = steps.div_(torch.tensor(self._divisors, dtype=torch.float64, device=device).unsqueeze(1))
        finite = torch.isfinite(steps).all(1)
        steps = torch.where(finite.unsqueeze(1), steps, 0.0)
        if device.type == "cpu":
            self._sum_sq = torch.cat([self._sum_sq.unsqueeze(0), steps]).cumsum(0)[-1]
        else:
            for row in steps:
                self._sum_sq.add_(row)
        counts = torch.tensor(self._counts, dtype=torch.long, device=device)
        self._samples.add_(finite.long().mul_(counts).sum())
        self._waiting, self._divisors, self._counts = [], [], []

    def estimate(self, model: Any, loss_fn: Callable[..., Any], data: Any) -> DiversityEstimate:
        import torch

        start = time.perf_counter()
        if self._hooks is None or self._sum_sq is None:
            return DiversityEstimate(value=math.nan, samples=0, seconds=0.0)
        hooks = self._hooks
        n_layers = len(hooks.layers)
        self._fold()
        # square().sum() in float64, not _foreach_norm: on CPU that accumulates naively (1e-4 off at 1M entries)
        param_sq = torch.stack([s.square().sum(dtype=torch.float64) for s in self._sum_grad])
        index = torch.tensor(self._layer_of_param, device=param_sq.device)
        layer_sq_of_sum = torch.zeros(n_layers, dtype=torch.float64, device=param_sq.device)
        layer_sq_of_sum.index_add_(0, index, param_sq)
        own = _summed_over_ranks(self._sum_sq, self._samples)  # the one all-reduce under torchrun
        both = torch.stack([own[:-1], layer_sq_of_sum])
        sum_sq, sq_of_sum, samples = torch.cat([both.sum(1), own[-1:]]).tolist()  # the one sync
        per_layer: dict[str, float] = {}
        if self.per_layer:
            for layer, (s1, s2) in zip(hooks.layers, both.T.tolist(), strict=True):
                per_layer[layer.key] = _ratio(s1, s2)
        seconds = self._seconds + hooks.seconds + (time.perf_counter() - start)
        return DiversityEstimate(
            value=_ratio(sum_sq, sq_of_sum),
            samples=int(samples),
            seconds=seconds,
            per_layer=per_layer,
            sum_sq_norms=sum_sq,
            sq_norm_of_sum=sq_of_sum,
        )

    def detach(self) -> None:
        if self._incoming is not None:
            self._incoming.release()
            self._incoming = None
        if self._selfcheck is not None:
            self._selfcheck.disarm()
            self._selfcheck = None
        if self._hooks is not None:
            self._hooks.detach()
            self._hooks = None
        self._sum_grad = []
        self._sum_sq = None

    # -- checks ----------------------------------------------------------------------------------
    def _check_hooks_saw_all_uses(self) -> None:
        from dbx.estimators.hooks import ROOT, EstimatorConfigError, display

        self._checked = True
        missed = self._hooks.unfired()
        if missed:
            listing = ", ".join(f"{display(layer.path)!r} ({type(layer.module).__name__})" for layer in missed[:8])
            raise EstimatorConfigError(
                f"estimator {self.name!r}: the parameters of {listing} received gradients although the "
                f"module was never called (the model uses its weights directly, e.g. F.linear(x, m.weight)), "
                f"so the hooks cannot see their per-sample gradients. Exclude them with "
                f"estimator.params.exclude: {[layer.path or ROOT for layer in missed[:8]]}, or use the "
                f"'subsampled' estimator."
            )


class _Incoming:
    """This rank's own gradient of each parameter in one backward, copied as autograd delivers it,
    before DDP's all-reduce replaces ``.grad`` with every rank's sum (what the self-check must
    compare the hooks' sums with under torchrun). Only the first measuring step pays for it."""

    def __init__(self, params: Sequence[Any]) -> None:
        self.grads: dict[int, Any] = {}
        self.handles = [p.register_hook(self._keeper(id(p))) for p in params if p.requires_grad]

    def _keeper(self, key: int) -> Callable[[Any], None]:
        def keep(grad: Any) -> None:
            self.grads[key] = grad.detach().clone() if key not in self.grads else self.grads[key] + grad.detach()

        return keep

    def release(self) -> dict[int, Any]:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return self.grads


def _summed_over_ranks(sum_sq: Any, samples: Any) -> Any:
    """``[per-layer sums of ||g_i||^2..., samples]`` over every rank's samples: one all-reduce of
    ``layers + 1`` numbers per measuring epoch. (The summed gradient needs none: DDP's all-reduced
    ``.grad`` is already the whole batch's.) In one process, the same vector without communication."""
    import torch

    from dbx.distributed import sum_across_ranks

    return sum_across_ranks(torch.cat([sum_sq, samples.view(1).to(sum_sq.dtype)]))


def _grouped(kernel_path: str, model: Any) -> bool:
    """Whether the hooks compute layers of equal shapes together (``dbx.estimators.grouped``): on the
    CUDA path, where a measuring step waits for its many small launches."""
    if kernel_path != "auto":
        return kernel_path == "cuda"
    first = next(model.parameters(), None)
    return first is not None and first.device.type == "cuda"


def _patterns(value: Sequence[str] | str) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _ratio(sum_sq: float, sq_of_sum: float) -> float:
    if sq_of_sum > 0:
        return sum_sq / sq_of_sum
    return math.inf if sum_sq > 0 else math.nan

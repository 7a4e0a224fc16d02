"""Gradient diversity in your own training loop: ``DiversityMeter``. **Public API** (see docs/your-loop.md).

::

    meter = dbx.DiversityMeter(model)                  # checks the model now; attaches nothing yet
    for epoch in range(1, epochs + 1):
        with meter.epoch():                            # hooks attached for this epoch only
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)    # mean reduction (the default), any micro-batching
                loss.backward()
                meter.step()                           # once per optimizer step, before clipping
                optimizer.step(); optimizer.zero_grad()
        print(meter.diversity, meter.samples)

What is measured (Yin et al., AISTATS 2018; DiveBatch, arXiv 2509.16173): over the per-sample loss
gradients g_i of every sample of the epoch's training steps (the weights move while it is
gathered, as in DiveBatch),

    diversity = S1 / ||S2||^2,    S1 = sum_i ||g_i||^2,    S2 = sum_i g_i.

The per-sample norms come from the step's own backward, through the layer hooks of dbx's
``exact`` estimator (``dbx.estimators.hooks``: no extra forward or backward, no per-sample
gradient materialised where the algebra avoids it); S2 from the parameters' ``.grad`` once per
optimizer step. Both stay on the device; ``step()`` never waits for it, and ``stop()`` reads the
result in one transfer. BatchNorm in training mode: see ``dbx.estimators.exact``.

The loss scale is given once, never per call. A backward carries ``c * sum_i loss_i`` over its
micro-batch, and the meter divides the hooks' norms by ``c**2`` and the gradient by ``c``:

- ``reduction="mean"`` (PyTorch's default): each optimizer step's gradient is the *mean* of its
  samples' gradients, so ``c = 1 / (samples in the step)``, counted by the hooks. That covers one
  ``F.cross_entropy(...)`` per step, and k equal micro-batches each back-propagating ``loss / k``
  (Lightning's and Hugging Face's gradient accumulation); with unequal micro-batches, weight each
  micro-batch's mean loss by its share of the step's samples.
- ``reduction="sum"``: the losses are summed (``reduction="sum"``), ``c = 1``.
- ``scaler=``: a ``torch.amp.GradScaler``; its scale at each backward is divided out on the
  device. bf16 autocast needs nothing (the hooks compute in float32).

``step()`` reads ``.grad`` as the backward left it, so call it before anything changes the
gradients (``clip_grad_norm_``, ``scaler.unscale_``, ``zero_grad``); that is checked. With
``copy_grads=True`` the meter copies the gradients at the end of each backward instead (one
float32 copy of the measured parameters while measuring), and ``step()`` may come anywhere before
the next step's first backward: after clipping, even after ``optimizer.step()``.

Misuse is an error (``MeterError``) with a message saying what to change, never a silent 0: a
``step()`` with no backward through the model since the last one, a backward not followed by
``step()`` before the next optimizer step or the end of the epoch, an epoch that measured zero
samples, gradients changed before ``step()``, and (at construction) a model with a layer whose
per-sample norms the hooks cannot compute (leave it out with ``exclude=``).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from dbx.errors import UserError
from dbx.estimators.hooks import ROOT, EstimatorConfigError, NormHooks, build_hooks, display
from dbx.protocols import DiversityEstimate

__all__ = ["DiversityMeter", "MeterError"]

_NAME = "DiversityMeter"


class MeterError(UserError):
    """The meter was used in a way that cannot give a right number; the message says how to fix it."""


class _BackwardHooks(NormHooks):
    """``NormHooks`` that call ``on_backward_end()`` once at the end of every backward reaching them.

    The first gradient hook to fire in a backward queues the callback on autograd's engine (as
    DDP does), so the meter sees each backward, micro-batches included, without any call from the
    user's loop.
    """

    def __init__(self, *args: Any, on_backward_end: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_backward_end = on_backward_end
        self._queued = False

    def _grad_hook(self, layer: Any, ctx: Any, fused: bool, grad: Tensor) -> None:
        if not self._queued and self.enabled:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)
        super()._grad_hook(layer, ctx, fused, grad)

    def _backward_end(self) -> None:
        self._queued = False
        self._on_backward_end()

    def _forward_hook(self, *args: Any, **kwargs: Any) -> None:
        try:
            super()._forward_hook(*args, **kwargs)
        except EstimatorConfigError as exc:  # e.g. a layer whose input is not batch-first
            raise _meter_error(exc) from exc


def _meter_error(exc: EstimatorConfigError) -> MeterError:
    """The hooks speak of a spec's estimator.params; say what the meter's arguments are."""
    return MeterError(f"{exc} (For DiversityMeter: pass exclude=[...] or layers=[...] to DiversityMeter(model, ...).)")


class DiversityMeter:
    """Exact gradient diversity over the steps of an epoch, in any PyTorch training loop.

    ``DiversityMeter(model, *, layers=None, exclude=(), reduction="mean", scaler=None,
    copy_grads=False)``:

    - ``layers``: module-path patterns (fnmatch; a pattern covers the modules below it, e.g.
      ``["fc"]`` or ``["layer4", "fc"]``) to measure; default every parameter-owning module. Only
      those are hooked, so restricting to the last layers makes measuring almost free.
    - ``exclude``: patterns to leave out of both sums (modules the hooks cannot handle).
    - ``reduction``, ``scaler``, ``copy_grads``: see the module docstring.
    - ``fuse_weight_grads``: as for the ``exact`` estimator (saves a weight-gradient computation
      per wide convolution; training is unchanged). Off under ``torch.distributed``.

    The model is checked here: a layer with trainable parameters that the hooks cannot measure
    is a ``MeterError`` naming it. Nothing is attached until ``start()`` (or ``epoch()``).

    Results of the last measured epoch: ``diversity``, ``per_layer`` (module path -> diversity of
    that module's parameters), ``sum_sq_norms`` (S1), ``sq_norm_of_sum`` (||S2||^2), ``samples``,
    ``seconds`` (time spent measuring), and ``result``, the ``dbx.DiversityEstimate`` a policy's
    ``next_batch_size`` takes (None after an epoch that was not measured).
    """

    def __init__(self, model: nn.Module, *, layers: Sequence[str] | None = None, exclude: Sequence[str] = (),
                 reduction: str = "mean", scaler: Any = None, copy_grads: bool = False,
                 fuse_weight_grads: bool = True) -> None:
        if reduction not in ("mean", "sum"):
            raise MeterError(f"{_NAME}(reduction={reduction!r}): use 'mean' (each step's gradient is the mean of its "
                             f"samples' gradients, PyTorch's default) or 'sum' (losses summed, reduction='sum')")
        layers = [layers] if isinstance(layers, str) else layers
        exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        self.model = model
        self.reduction = reduction
        self.scaler = scaler
        self.copy_grads = bool(copy_grads)
        self.result: DiversityEstimate | None = None
        try:
            _, own = build_hooks(model, include=layers, exclude=exclude, estimator=_NAME)
        except EstimatorConfigError as exc:
            raise _meter_error(exc) from exc
        fuse = fuse_weight_grads and not _distributed()
        self._hooks = _BackwardHooks(model, own.covered, estimator=_NAME, fuse=fuse,
                                     on_backward_end=self._backward_end)
        self._params = [p for layer in self._hooks.layers for p in layer.params]
        self._layer_of_param = [layer.index for layer in self._hooks.layers for _ in layer.params]
        self.measuring = False
        self._handles: list[Any] = []

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Attach the hooks and start an epoch's sums (on the parameters' device)."""
        if self.measuring:
            raise MeterError(f"{_NAME}.start(): already measuring; call stop() first (or use `with meter.epoch():`)")
        if _distributed():
            # Each rank's hooks see only its own samples, while .grad holds DDP's average over all ranks:
            # the ratio of the two would be a wrong number, not one rank's diversity.
            raise MeterError(
                f"{_NAME} measures one process's training; under torch.distributed (world size "
                f"{_world_size()}) it would mix this rank's per-sample norms with DDP's averaged gradient. "
                f"Measure on one process, or train with `dbx run --nproc N` (or torchrun -m dbx run), "
                f"whose exact estimator adds up every rank's sums")
        started = time.perf_counter()
        self.result = None
        device = self._params[0].device
        n_layers = len(self._hooks.layers)
        self._sum_sq = torch.zeros(n_layers, dtype=torch.float64, device=device)  # S1 per layer
        self._sum_grad = [torch.zeros_like(p, dtype=torch.float32) for p in self._params]  # S2
        self._samples = torch.zeros((), dtype=torch.long, device=device)  # of the steps counted
        self._step_sq = torch.zeros_like(self._sum_sq)  # this step's raw norms (scaled by c)
        self._copies = [torch.zeros_like(p, dtype=torch.float32) for p in self._params] if self.copy_grads else []
        self._step_scale = torch.ones((), device=device) if self._scaling() else None
        self._reset_step()
        self._steps = 0
        self._checked = False
        self._hook_seconds = self._hooks.seconds
        self._hooks.attach()
        # after every optimizer step: were there backwards that no step() has counted yet?
        self._handles.append(register_optimizer_step_post_hook(self._optimizer_stepped))
        self.measuring = True
        self._seconds = time.perf_counter() - started

    def step(self) -> None:
        """Add the backwards since the last ``step()`` as one optimizer step. No-op while not measuring.

        Call it once per optimizer step, after the step's last backward. Without ``copy_grads``,
        before anything changes ``.grad`` (clipping, ``scaler.unscale_``, ``zero_grad``).
        """
        if not self.measuring:
            return
        started = time.perf_counter()
        if self._step_backwards == 0:
            raise MeterError(
                f"{_NAME}.step() found no backward through the model since the last step: call it once per "
                f"optimizer step, after loss.backward() (a loss computed from the model's output, with gradients "
                f"enabled), not twice per step. (A model that never calls its layers as modules, e.g. uses "
                f"F.linear(x, layer.weight), gives the hooks nothing to see either: leave those out with exclude=.)")
        if not self._checked:
            self._check_every_use_was_seen()
        grads = self._copies if self.copy_grads else self._grads_unchanged()
        present = self._present
        sums = self._sum_grad
        if not all(present):  # parameters that took no part in this step
            sums = [s for s, used in zip(sums, present, strict=True) if used]
            grads = [g for g, used in zip(grads, present, strict=True) if used]
        c = 1.0 / self._step_samples if self.reduction == "mean" else 1.0
        finite = torch.isfinite(self._step_sq).all()  # an fp16 step whose gradients overflowed: left out
        self._samples.add_(finite.long() * self._step_samples)
        if self._step_scale is None:
            self._sum_sq.add_(torch.where(finite, self._step_sq, 0.0), alpha=1.0 / (c * c))
            if grads:
                torch._foreach_add_(sums, grads, alpha=1.0 / c)
        else:  # a GradScaler's scale, on the device: masked, never read on the host
            scale = self._step_scale * c
            self._sum_sq.add_(torch.where(finite, self._step_sq / (scale * scale), 0.0))
            for total, grad in zip(sums, grads, strict=True):
                total.add_(torch.where(finite, grad / scale, 0.0))
        self._steps += 1
        self._reset_step()
        self._seconds += time.perf_counter() - started

    def stop(self) -> DiversityEstimate:
        """Detach the hooks and return the epoch's estimate (also kept as ``result``); one host sync."""
        if not self.measuring:
            raise MeterError(f"{_NAME}.stop() without start(): nothing is being measured")
        pending = self._step_backwards
        self._detach()
        if pending:
            raise MeterError(
                f"{_NAME}: the last {pending} backward(s) of the epoch were not followed by meter.step(); call "
                f"meter.step() once per optimizer step, after its last backward")
        estimate = self._estimate()
        if estimate.samples == 0:
            if self._steps == 0:
                raise MeterError(f"{_NAME}: the epoch measured no step, so there is no diversity to report: call "
                                 f"meter.step() after each optimizer step's backward, inside meter.epoch()")
            raise MeterError(f"{_NAME}: all {self._steps} measured steps had non-finite gradients (fp16 overflow or "
                             f"a NaN/inf loss), so the epoch measured zero samples")
        self.result = estimate
        return estimate

    def cancel(self) -> None:
        """Detach the hooks and drop the epoch's sums without a result (training stopped mid-epoch)."""
        if self.measuring:
            self._detach()
        self.result = None

    @contextlib.contextmanager
    def epoch(self, measure: bool = True) -> Iterator[DiversityMeter]:
        """``with meter.epoch():`` measures the steps inside; ``measure=False`` attaches nothing (steps
        cost nothing, ``result`` is None afterwards), e.g. ``meter.epoch(measure=policy.measures_in(e))``.
        On an exception inside, the hooks are removed and nothing is reported."""
        self.result = None
        if not measure:
            yield self
            return
        self.start()
        try:
            yield self
        except BaseException:
            self.cancel()
            raise
        self.stop()

    # -- results -----------------------------------------------------------------------------------
    @property
    def diversity(self) -> float:
        """S1 / ||S2||^2 of the last measured epoch (inf or nan if the summed gradient vanished)."""
        return self._last().value

    @property
    def per_layer(self) -> dict[str, float]:
        """Module path -> that module's own S1 / ||S2||^2 (the model itself is ``"root"``)."""
        return dict(self._last().per_layer)

    @property
    def sum_sq_norms(self) -> float:
        """S1 = sum_i ||g_i||^2 over the epoch's samples."""
        return float(self._last().sum_sq_norms)

    @property
    def sq_norm_of_sum(self) -> float:
        """||S2||^2 = ||sum_i g_i||^2 over the epoch's samples."""
        return float(self._last().sq_norm_of_sum)

    @property
    def samples(self) -> int:
        """Per-sample gradients the sums run over (every sample of every counted step)."""
        return self._last().samples

    @property
    def seconds(self) -> float:
        """Host time the meter spent in the last measured epoch (hooks, steps, the estimate)."""
        return self._last().seconds

    def metrics(self, *, per_layer: bool = False) -> dict[str, float]:
        """The last estimate as metric names and values (``diversity``, ``diversity_samples``,
        ``diversity_sum_sq_norms``, ``diversity_sq_norm_of_sum``, ``estimator_seconds``, and with
        ``per_layer`` one ``diversity/<module path>`` each), as ``dbx run`` names them."""
        r = self._last()
        out = {"diversity": r.value, "diversity_samples": float(r.samples),
               "diversity_sum_sq_norms": float(r.sum_sq_norms), "diversity_sq_norm_of_sum": float(r.sq_norm_of_sum),
               "estimator_seconds": r.seconds}
        if per_layer:
            out.update({f"diversity/{key}": value for key, value in r.per_layer.items()})
        return out

    @property
    def layers(self) -> list[str]:
        """The measured modules' paths, in the order of ``per_layer``."""
        return [layer.key for layer in self._hooks.layers]

    @property
    def pending_backwards(self) -> int:
        """Backwards seen since the last ``step()`` (0 while not measuring)."""
        return self._step_backwards if self.measuring else 0

    # -- internals ---------------------------------------------------------------------------------
    def _last(self) -> DiversityEstimate:
        if self.result is None:
            if self.measuring:
                raise MeterError(f"{_NAME}: the epoch is still being measured; its result exists after stop() "
                                 f"(the end of `with meter.epoch():`)")
            raise MeterError(f"{_NAME}: no measured epoch to report: measure one with `with meter.epoch():` (or "
                             f"start()/stop()); an epoch entered with measure=False has no result")
        return self.result

    def _scaling(self) -> bool:
        return self.scaler is not None and (not hasattr(self.scaler, "is_enabled") or self.scaler.is_enabled())

    def _reset_step(self) -> None:
        self._step_sq.zero_()
        self._step_samples = 0
        self._step_backwards = 0
        self._stepped_with_pending = False
        self._grads: list[Tensor | None] = []
        self._versions: list[int] = []
        self._present = [False] * len(self._params)

    def _backward_end(self) -> None:
        """At the end of each backward that reached the hooks (inside autograd's engine)."""
        started = time.perf_counter()
        if self._stepped_with_pending:
            self._stepped_with_pending = False
            raise MeterError(
                f"{_NAME}: an optimizer step ran after {self._step_backwards} backward(s) that meter.step() never "
                f"counted; call meter.step() once per optimizer step, after its last backward")
        hooks = self._hooks
        batch = hooks.batch
        rows = hooks.collect()  # (layers, B): squared norms of c * g_i (times the GradScaler's scale)
        if rows is None:
            return
        self._step_sq.add_(rows.sum(1, dtype=torch.float64))
        self._step_samples += batch if batch is not None else rows.shape[1]
        self._step_backwards += 1
        grads = [p.grad for p in self._params]
        self._present = [g is not None for g in grads]
        if self.copy_grads:
            pairs = [(c, g) for c, g in zip(self._copies, grads, strict=True) if g is not None]
            if pairs:
                torch._foreach_copy_([c for c, _ in pairs], [g for _, g in pairs])
        else:
            self._grads = grads
            self._versions = [g._version if g is not None else -1 for g in grads]
        if self._step_scale is not None:
            scale = self.scaler._get_scale_async() if hasattr(self.scaler, "_get_scale_async") else None
            if scale is not None:  # the scale the loss was multiplied by (update() changes it in place later)
                self._step_scale.copy_(scale)
        self._seconds += time.perf_counter() - started

    def _grads_unchanged(self) -> list[Tensor | None]:
        """``.grad`` as the last backward left it, or an error naming what to do."""
        for param, before, version in zip(self._params, self._grads, self._versions, strict=True):
            grad = param.grad
            if grad is not before or (grad is not None and grad._version != version):
                raise MeterError(
                    f"{_NAME}.step(): the gradients changed between the backward and meter.step() (gradient "
                    f"clipping, GradScaler.unscale_ or zero_grad ran in between), so the summed gradient would not "
                    f"match the per-sample norms. Call meter.step() right after the step's last backward, or create "
                    f"the meter with copy_grads=True (it then copies the gradients at each backward)")
        return self._grads

    def _optimizer_stepped(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._step_backwards:
            self._stepped_with_pending = True

    def _check_every_use_was_seen(self) -> None:
        self._checked = True
        missed = self._hooks.unfired()
        if missed:
            listing = ", ".join(f"{display(layer.path)!r} ({type(layer.module).__name__})" for layer in missed[:8])
            raise MeterError(
                f"{_NAME}: the parameters of {listing} received gradients although the module was never called (the "
                f"model uses its weights directly, e.g. F.linear(x, m.weight)), so the hooks cannot see their "
                f"per-sample gradients. Leave them out: DiversityMeter(model, exclude="
                f"{[layer.path or ROOT for layer in missed[:8]]})")

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooks.detach()
        self._hooks._queued = False
        self.measuring = False
        self._grads = []

    def _estimate(self) -> DiversityEstimate:
        started = time.perf_counter()
        n_layers = len(self._hooks.layers)
        # square().sum() in float64, not _foreach_norm: on CPU that accumulates naively (1e-4 off at 1M entries)
        param_sq = torch.stack([s.square().sum(dtype=torch.float64) for s in self._sum_grad])
        index = torch.tensor(self._layer_of_param, device=param_sq.device)
        layer_sq_of_sum = torch.zeros(n_layers, dtype=torch.float64, device=param_sq.device)
        layer_sq_of_sum.index_add_(0, index, param_sq)
        both = torch.stack([self._sum_sq, layer_sq_of_sum])
        host = torch.cat([both.sum(1), self._samples.view(1).double(), both.T.flatten()]).tolist()  # the one sync
        sum_sq, sq_of_sum, samples = host[:3]
        pairs = zip(host[3::2], host[4::2], strict=True)
        per_layer = {layer.key: _ratio(s1, s2) for layer, (s1, s2) in zip(self._hooks.layers, pairs, strict=True)}
        self._sum_grad = []
        self._copies = []
        seconds = self._seconds + (self._hooks.seconds - self._hook_seconds) + (time.perf_counter() - started)
        return DiversityEstimate(value=_ratio(sum_sq, sq_of_sum), samples=int(samples), seconds=seconds,
                                 per_layer=per_layer, sum_sq_norms=sum_sq, sq_norm_of_sum=sq_of_sum)

    def __repr__(self) -> str:
        state = "measuring" if self.measuring else "idle"
        return f"{_NAME}({len(self._hooks.layers)} layers, reduction={self.reduction!r}, {state})"


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size()


def _ratio(sum_sq: float, sq_of_sum: float) -> float:
    if sq_of_sum > 0:
        return sum_sq / sq_of_sum
    return math.inf if sum_sq > 0 else math.nan

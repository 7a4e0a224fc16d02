"""``cuda_graphs: true``: the plain training step, captured once per batch size and replayed.

At small batches a GPU step is bound by the host: Python and one kernel launch per operation,
not arithmetic. A CUDA graph records the step's kernels once (forward, backward, optimizer step,
gradient clipping) and replays them with one launch. What a capture needs, and what dbx does:

- static memory: each batch is copied into the graph's input buffers, and the step's loss and
  predictions are copied out of its outputs (two small copies per step);
- static shapes: one graph per distinct batch shape, so B and the epoch's shorter last batch
  each have their own; the first step at a shape runs eagerly (it warms up lazy state, such as
  the optimizer's momentum buffers) and the second is captured;
- constant hyperparameters: the optimizer's lr is recorded into the graph as a number, so when a
  group's hyperparameters change (the schedule, a batch-size change) every graph is dropped and
  captured anew at its next step;
- an optimizer whose state lives on the device: torch's Adam-family optimizers are switched to
  ``capturable=True``; SGD needs nothing. Any other optimizer, fp16 (the GradScaler reads its
  overflow flag on the host) and ``on_nonfinite: skip_step`` (which reads every loss) keep the
  step eager, with one message saying why.

Measuring steps stay eager: the estimator's hooks do Python work that a replay would skip.
If a capture fails (a model that synchronises, or uses host data in its forward), the message
names the error and the run continues without graphs.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["StepGraphs", "graphs_unsupported"]

_CAPTURABLE_FLAG = "capturable"


def graphs_unsupported(parts: Any, skip_nonfinite: bool) -> str | None:
    """Why this run's plain step cannot be captured, or None when it can."""
    if parts.device.type != "cuda":
        return f"CUDA graphs need a CUDA device, and this run is on {parts.device}"
    if parts.scaler is not None:
        return "amp: fp16's GradScaler reads its overflow flag on the host every step"
    if skip_nonfinite:
        return "on_nonfinite: skip_step reads every step's loss on the host"
    optimizer = parts.optimizer
    if not isinstance(optimizer, torch.optim.SGD) and not all(_CAPTURABLE_FLAG in g for g in optimizer.param_groups):
        return f"the optimizer {type(optimizer).__name__} cannot be captured (it keeps its step count on the host)"
    return None


class StepGraphs:
    """``graphs.step(inputs, targets, units, gradient, clip, params)`` trains on one batch,
    replaying a captured graph when one fits; ``failed`` once a capture has failed (the loop
    then trains eagerly). See the module docstring."""

    def __init__(self, parts: Any, *, max_micro_batch: int | None, say: Callable[[str], None] = print) -> None:
        self.parts = parts
        self.max_micro_batch = max_micro_batch
        self.say = say
        self.failed = False
        self._graphs: dict[tuple, _Captured] = {}
        self._warm: set[tuple] = set()
        self._hyper: tuple = ()
        for group in parts.optimizer.param_groups:  # Adam and kin keep their step on the device
            if _CAPTURABLE_FLAG in group:
                group[_CAPTURABLE_FLAG] = True
                for param in group["params"]:  # a resumed run's step counts were loaded to the host
                    state = parts.optimizer.state.get(param, {})
                    if isinstance(state.get("step"), torch.Tensor):
                        state["step"] = state["step"].to(param.device)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, units: Any, gradient: torch.Tensor,
             clip: float | None, params: list[torch.nn.Parameter]) -> tuple[Any, ...]:
        """One training step on ``(inputs, targets)``; returns what ``EpochTally.add`` takes:
        ``(loss, units, samples, predictions, targets, norm)``."""
        from dbx.train.loop import forward_backward, update

        hyper = _hyperparameters(self.parts.optimizer)
        if hyper != self._hyper:  # the lr is a constant inside a graph: capture again
            self._graphs.clear()
            self._warm.clear()
            self._hyper = hyper
        key = (tuple(inputs.shape), inputs.dtype, tuple(targets.shape), targets.dtype)
        captured = self._graphs.get(key)
        if captured is None and not self.failed and key in self._warm:
            captured = self._capture(key, inputs, targets, gradient, clip, params)
        if captured is not None:
            loss, units, predicted, norm = captured.replay(inputs, targets, units)
        else:  # the first step at this shape (or a failed capture): eagerly, on a side stream
            self._warm.add(key)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss, predictions, _ = forward_backward(self.parts, inputs, targets, self.max_micro_batch, gradient,
                                                        None, None)
                norm = update(self.parts, params, clip)
                predicted = _cat(predictions)
            torch.cuda.current_stream().wait_stream(side)
        return loss, units, inputs.shape[0], [] if predicted is None else [predicted], \
            [] if predicted is None else [targets], norm

    def _capture(self, key: tuple, inputs: torch.Tensor, targets: torch.Tensor, gradient: torch.Tensor,
                 clip: float | None, params: list[torch.nn.Parameter]) -> "_Captured | None":
        try:
            captured = _Captured.record(self.parts, inputs, targets, gradient, clip, params, self.max_micro_batch)
        except Exception as error:  # noqa: BLE001 - any capture failure means: train without graphs
            self.failed = True
            self._graphs.clear()
            self.parts.optimizer.zero_grad(set_to_none=True)
            self.say(f"cuda_graphs: the training step could not be captured ({type(error).__name__}: "
                     f"{str(error).splitlines()[0] if str(error) else ''}); training continues without CUDA graphs")
            return None
        self._graphs[key] = captured
        return captured


class _Captured:
    """One captured step: its input buffers, the graph, and its outputs."""

    def __init__(self, graph: Any, buffers: tuple[torch.Tensor, ...], outputs: tuple[Any, ...]) -> None:
        self.graph, self.buffers, self.outputs = graph, buffers, outputs

    @classmethod
    def record(cls, parts: Any, inputs: torch.Tensor, targets: torch.Tensor, gradient: torch.Tensor,
               clip: float | None, params: list[torch.nn.Parameter], max_micro_batch: int | None) -> "_Captured":
        from dbx.train.loop import forward_backward

        static_inputs, static_targets = inputs.clone(), targets.clone()
        gradient = gradient.clone()  # the graph reads it at this address at every replay
        parts.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients inside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            units = parts.task.units(static_targets)
            if not isinstance(units, int):  # counted on the device: part of the graph
                gradient = 1.0 / units
            loss, predictions, _ = forward_backward(parts, static_inputs, static_targets, max_micro_batch,
                                                    gradient, None, None)
            norm = torch.nn.utils.clip_grad_norm_(params, clip, error_if_nonfinite=False) if clip is not None else None
            parts.optimizer.step()  # no zero_grad: each replay's backward writes the gradients afresh
        # The graph keeps its gradients' memory; dropping the Python references lets an eager step
        # (a measuring epoch) start from no gradients, as it expects, instead of adding to the graph's.
        parts.optimizer.zero_grad(set_to_none=True)
        return cls(graph, (static_inputs, static_targets, gradient), (loss, units, _cat(predictions), norm))

    def replay(self, inputs: torch.Tensor, targets: torch.Tensor, units: Any) -> tuple[Any, ...]:
        static_inputs, static_targets, _ = self.buffers
        static_inputs.copy_(inputs, non_blocking=True)
        static_targets.copy_(targets, non_blocking=True)
        self.graph.replay()
        loss, static_units, predictions, norm = self.outputs
        return (loss.clone(), units if isinstance(static_units, int) else static_units.clone(),
                None if predictions is None else predictions.clone(), None if norm is None else norm.clone())


def _hyperparameters(optimizer: torch.optim.Optimizer) -> tuple:
    return tuple(tuple(sorted((k, v) for k, v in group.items() if k != "params" and isinstance(v, (int, float))))
                 for group in optimizer.param_groups)


def _cat(predictions: list[torch.Tensor]) -> torch.Tensor | None:
    """A step's predictions as one tensor (micro-batches joined), None for tasks without accuracy."""
    if not predictions:
        return None
    return predictions[0] if len(predictions) == 1 else torch.cat(predictions)

"""The training loop: one function, ``fit``, that reads top to bottom.

Per step: draw a logical batch of the current size B, split it into micro-batches of at most
``max_micro_batch`` (gradients accumulate, so the update is the one of the whole batch),
forward/backward (the estimator's hooks are attached only in measuring epochs), gradient
clipping if asked, optimizer step. How the loss is formed and normalised, and what is counted as
correct, depends on the task (classification, regression, sequence): ``dbx.train.tasks``.
Per epoch: the estimator's diversity (measuring epochs only), evaluation on the test split, the
policy's next batch size, the lr rescale when B changes, one log line and one batch of metrics.

The loop never imports mlflow: it hands each epoch's metrics to ``tracker.log_epoch``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import torch

from dbx.distributed import global_units, sum_across_ranks
from dbx.distributed.ddp import accumulating
from dbx.errors import RunFailed
from dbx.protocols import DiversityEstimate, EpochState
from dbx.train import throughput
from dbx.train.cuda_graphs import StepGraphs, graphs_unsupported
from dbx.train.lr import rescale_factor, scheduled_lr
from dbx.train.parts import Parts
from dbx.train.progress import EpochProgress
from dbx.train.tally import EpochTally, TrainedEpoch


class Tracker(Protocol):
    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...


@dataclass
class RunState:
    """Everything the loop carries from one epoch to the next (what a checkpoint must hold)."""

    epoch: int = 0  # epochs completed
    batch_size: int = 0
    lr_rescale: float = 1.0
    samples_seen: int = 0
    optimizer_steps: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    throughput: throughput.Table = field(default_factory=dict)  # see dbx.train.throughput


@dataclass
class Summary:
    """The numbers a run ends with (logged as summary metrics and summary.json)."""

    epochs: int
    final_batch_size: int
    total_train_seconds: float  # not "train_seconds": that name is the per-epoch cumulative metric
    total_eval_seconds: float
    final_test_loss: float
    final_test_accuracy: float | None = None
    best_test_accuracy: float | None = None
    final_test_perplexity: float | None = None  # sequence tasks
    best_test_perplexity: float | None = None
    epochs_to_target: int | None = None
    seconds_to_target: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """The summary values that are numbers (None, e.g. a target never reached, is left out)."""
        return {k: float(v) for k, v in asdict(self).items() if v is not None}


def fit(spec: Any, parts: Parts, tracker: Tracker, *, say: Callable[[str], None] = print,
        state: RunState | None = None, on_epoch_end: Callable[[RunState], None] | None = None) -> Summary:
    """Train ``parts.model`` for ``spec.epochs`` epochs with the policy's batch sizes.

    ``state`` continues a resumed run; ``on_epoch_end(state)`` (the checkpoint) runs after the
    batch-size decision of each epoch and before its metrics are logged, so a run killed in
    between re-logs nothing twice: the resume logs the epochs the store is missing.
    """
    model, optimizer, policy, estimator = parts.model, parts.optimizer, parts.policy, parts.estimator
    loader = parts.train_loader
    state = state or RunState(batch_size=policy.initial_batch_size())
    loader.set_batch_size(state.batch_size)
    wall_start = time.perf_counter() - state.train_seconds - state.eval_seconds
    say(_batch_line(spec, state.batch_size, _lr_for(spec, state, state.epoch + 1), "start"))
    graphs = step_graphs(spec, parts, say)  # cuda_graphs: true (else None)

    for epoch in range(state.epoch + 1, spec.epochs + 1):
        lr = _lr_for(spec, state, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        measuring = estimator is not None and policy.measures_in(epoch)

        # --- train one epoch (the estimator watches it only when the policy asked) ---------
        started = time.perf_counter()
        if measuring:
            estimator.attach(model)
        with EpochProgress(f"epoch {epoch}/{spec.epochs}", total=len(loader)) as progress:
            trained = train_one_epoch(parts, spec.max_micro_batch, estimator if measuring else None, progress.advance,
                                      skip_nonfinite=spec.on_nonfinite == "skip_step", clip=spec.clip_grad_norm,
                                      graphs=None if measuring else graphs)
        train_loss, train_acc = trained.loss, trained.accuracy
        diversity: DiversityEstimate | None = None
        if measuring:
            try:
                diversity = estimator.estimate(model, parts.loss_fn, parts.data.train)
            finally:
                estimator.detach()
        _synchronize(parts.device)
        epoch_seconds = time.perf_counter() - started
        if not math.isfinite(train_loss) or (trained.skipped and trained.skipped == trained.steps):
            step = state.optimizer_steps + (trained.first_bad if trained.first_bad >= 0 else trained.steps)
            raise RunFailed(
                f"training diverged in epoch {epoch} at step {step}: the training loss is not finite "
                f"(lr {lr:g}, batch size {state.batch_size}). Lower optimizer.lr, or use lr_scaling: sqrt.",
                reason="nonfinite_loss", epoch=epoch, step=step)

        # --- evaluate ---------------------------------------------------------------------
        started = time.perf_counter()
        test_loss, test_acc, test_nll = evaluate(parts)
        eval_seconds = time.perf_counter() - started

        state.epoch = epoch
        state.samples_seen += trained.samples
        state.optimizer_steps += trained.steps
        state.train_seconds += epoch_seconds
        state.eval_seconds += eval_seconds
        throughput.record(state.throughput, state.batch_size, trained.samples, epoch_seconds, diversity)
        metrics = {
            **parts.task.metrics("train", train_loss, train_acc),
            **parts.task.metrics("test", test_loss, test_acc, test_nll),
            "batch_size": float(state.batch_size), "lr": lr,
            "epoch_seconds": epoch_seconds, "eval_seconds": eval_seconds,
            "train_seconds": state.train_seconds,
            "wall_seconds": time.perf_counter() - wall_start,
            "samples_seen": float(state.samples_seen), "optimizer_steps": float(state.optimizer_steps),
        }
        if trained.grad_norm is not None:
            metrics["grad_norm"] = trained.grad_norm
        if spec.on_nonfinite == "skip_step":
            metrics["skipped_steps"] = float(trained.skipped)
        if diversity is not None:
            metrics["diversity"] = diversity.value
            metrics["estimator_seconds"] = diversity.seconds
            metrics["diversity_samples"] = float(diversity.samples)  # the policy's inputs, for a replay
            if diversity.sum_sq_norms is not None and diversity.sq_norm_of_sum is not None:
                metrics["sum_sq_norms"] = diversity.sum_sq_norms
                metrics["sq_norm_of_sum"] = diversity.sq_norm_of_sum
            metrics.update({f"diversity/{layer}": v for layer, v in diversity.per_layer.items()})

        # --- the batch-size decision: the one place where B and the lr rescale change -------
        epoch_state = EpochState(
            epoch=epoch, epochs=spec.epochs, step=state.optimizer_steps, batch_size=state.batch_size,
            lr=lr, samples_seen=state.samples_seen, dataset_size=loader.num_samples,
            train_loss=train_loss, test_loss=test_loss, train_accuracy=train_acc, test_accuracy=test_acc,
            throughput=throughput.samples_per_second(state.throughput))
        new_batch = _checked_batch_size(policy.next_batch_size(epoch_state, diversity), spec.policy.name)
        if hasattr(policy, "metrics"):  # optional: a policy's own numbers, e.g. a smoothed noise scale
            metrics.update({f"policy/{key}": float(value) for key, value in policy.metrics().items()})
        state.history.append({"epoch": epoch, **metrics})
        changed = new_batch != state.batch_size
        if changed:
            factor = rescale_factor(parts.lr_scaling, state.batch_size, new_batch)
            if hasattr(policy, "lr_factor"):
                factor *= policy.lr_factor(state.batch_size, new_batch)
            state.lr_rescale *= factor
            state.batch_size = new_batch
            loader.set_batch_size(new_batch)
        if on_epoch_end is not None:
            on_epoch_end(state)
        tracker.log_epoch(epoch, metrics)
        say(_epoch_line(spec, metrics, epoch))
        if changed and epoch < spec.epochs:
            say(_batch_line(spec, new_batch, _lr_for(spec, state, epoch + 1), f"after epoch {epoch}"))

    return summarize(spec, state)


def train_one_epoch(parts: Parts, max_micro_batch: int | None, estimator: Any, on_step: Callable[[], None],
                    *, skip_nonfinite: bool = False, clip: float | None = None,
                    graphs: StepGraphs | None = None) -> TrainedEpoch:
    """One pass over the training data.

    The step does what a bare hand-written loop does and little else: losses, predictions and
    gradient norms are kept on the device and read once at the end (``dbx.train.tally``), so the
    step never waits for the device; only ``skip_nonfinite`` must look at each step's loss.

    The step back-propagates ``loss_scale * sum_i loss_i``, with ``loss_scale`` one over the
    logical batch's samples (or counted tokens: ``Task.units``), so the update is that of the
    batch's mean loss however it is split into micro-batches, and the estimator divides the same
    ``loss_scale`` out. Under torchrun each rank runs this on its slice of every batch, with
    ``loss_scale`` over the whole global batch: DDP sums the ranks' gradients (``dbx.distributed``),
    so the step is the same as in one process. With ``clip``, the gradient's global norm is clipped to it after the
    estimator has read the step (its statistic is of the unclipped per-sample gradients) and
    before the optimizer steps; under fp16 the gradients are unscaled first.

    ``graphs`` (``cuda_graphs: true``, plain epochs only) replays each step as a captured CUDA
    graph (``dbx.train.cuda_graphs``), the same step as below.
    """
    parts.model.train()
    params = [p for p in parts.model.parameters() if p.requires_grad] if clip is not None else []
    tally = EpochTally(parts.task, parts.device)
    gradients = GradientScales(parts.device)
    steps = skipped = 0
    loader = parts.train_loader
    for inputs, targets in loader:
        batch = loader.global_batch(steps)  # every rank's share of the step together
        units = global_units(parts.task.units(targets), inputs.shape[0], batch)
        gradient = gradients.of(units)  # the step's loss is the mean over the logical batch
        loss_scale = 1.0 / units if isinstance(units, int) else gradient
        if graphs is not None and not graphs.failed:
            tally.add(*graphs.step(inputs, targets, units, gradient, clip, params))
            steps += 1
            on_step()
            continue
        # fp16 multiplies the loss by the GradScaler's factor; the estimator must divide it out
        scaler = parts.scaler
        grad_scale = _scale_on_device(scaler, parts.device) if scaler is not None and estimator is not None else 1.0
        loss, predictions, chunk_targets = forward_backward(
            parts, inputs, targets, max_micro_batch, gradient, estimator, loss_scale * grad_scale)
        if skip_nonfinite and not torch.isfinite(sum_across_ranks(loss.clone())).item():  # all ranks agree
            parts.optimizer.zero_grad(set_to_none=True)
            if estimator is not None:  # drops the step's non-finite norms; no gradients to add
                estimator.on_step(loss_scale * grad_scale)
            skipped += 1
        else:
            if estimator is not None:
                estimator.on_step(loss_scale * grad_scale)
            norm = update(parts, params, clip)
            tally.add(loss, units, batch, predictions, chunk_targets, norm)
        steps += 1
        on_step()
    return tally.finish(steps, skipped, clipped=clip is not None)


def forward_backward(parts: Parts, inputs: torch.Tensor, targets: torch.Tensor, max_micro_batch: int | None,
                     gradient: torch.Tensor, estimator: Any, estimator_scale: Any,
                     ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Forward and backward of one logical batch, in micro-batches of at most ``max_micro_batch``
    (gradients accumulate). ``gradient`` is ``loss_scale`` as a device tensor: backward starts
    from it, which is ``(loss * loss_scale).backward()`` without the multiplication.

    Returns the batch's summed loss (detached) and, for tasks with an accuracy, each
    micro-batch's predictions with its targets (empty lists otherwise)."""
    task = parts.task
    if max_micro_batch and inputs.shape[0] > max_micro_batch:
        chunks = list(zip(inputs.split(max_micro_batch), targets.split(max_micro_batch)))
    else:
        chunks = [(inputs, targets)]
    losses, predictions, chunk_targets = [], [], []
    net = parts.net if parts.net is not None else parts.model  # the model in DDP under torchrun
    if parts.compiled is not None and estimator is None:  # compile: true compiles plain steps only (one process)
        net = parts.compiled
    last = len(chunks) - 1
    for chunk, (x, y) in enumerate(chunks):
        with accumulating(net, more_chunks=chunk < last):  # DDP all-reduces at the last micro-batch only
            if parts.amp_dtype is None:  # an autocast that is off still costs its enter and exit every step
                outputs = net(x)
            else:
                with parts.autocast():
                    outputs = net(x)
            loss = task.loss_fn(outputs.float(), y, reduction="sum")
            if parts.scaler is not None:
                parts.scaler.scale(loss * gradient).backward()
            else:
                loss.backward(gradient)
        if estimator is not None:
            estimator.on_backward(estimator_scale)
        losses.append(loss.detach())
        if task.has_accuracy:
            predictions.append(task.predictions(outputs))  # argmax: no gradient to detach from
            chunk_targets.append(y)
    loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
    return loss, predictions, chunk_targets


def update(parts: Parts, params: list[torch.nn.Parameter], clip: float | None) -> torch.Tensor | None:
    """Clip (if asked), step the optimizer, clear the gradients. Returns the unclipped global
    gradient norm when clipping, else None."""
    optimizer, scaler = parts.optimizer, parts.scaler
    norm = None
    if clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, clip, error_if_nonfinite=False)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step itself when fp16 gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def step_graphs(spec: Any, parts: Parts, say: Callable[[str], None]) -> StepGraphs | None:
    """``cuda_graphs: true``: the run's captured steps, or None with a line saying why they cannot be."""
    if not spec.cuda_graphs:
        return None
    why_not = graphs_unsupported(parts, skip_nonfinite=spec.on_nonfinite == "skip_step")
    if why_not is not None:
        say(f"cuda_graphs: training without CUDA graphs: {why_not}")
        return None
    return StepGraphs(parts, max_micro_batch=spec.max_micro_batch, say=say)


class GradientScales:
    """``loss_scale`` as a 0-d device tensor, made once per batch size (per number of counted
    units) instead of once per step. Units counted on the device are a tensor already."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cache: dict[int, torch.Tensor] = {}

    def of(self, units: int | torch.Tensor) -> torch.Tensor:
        if not isinstance(units, int):
            return 1.0 / units
        scale = self._cache.get(units)
        if scale is None:
            scale = self._cache[units] = torch.full((), 1.0 / units, device=self.device)
        return scale


@torch.no_grad()
def evaluate(parts: Parts) -> tuple[float, float | None, float | None]:
    """Mean loss, accuracy and token cross-entropy (sequence tasks; else None) on the test split,
    in eval mode. Means are per sample, or per counted token for sequences. Under torchrun each rank
    evaluates its slice of each batch and the sums are added over the ranks."""
    model, task = parts.model, parts.task
    model.eval()
    loss_sum = torch.zeros((), device=parts.device)
    nll_sum = torch.zeros((), device=parts.device)
    correct = torch.zeros((), device=parts.device, dtype=torch.long)
    units: int | torch.Tensor = 0
    for inputs, targets in parts.test_loader:
        with parts.autocast():
            outputs = model(inputs)
        loss = task.loss_fn(outputs.float(), targets, reduction="sum")
        loss_sum += loss
        if task.kind == "sequence":
            nll_sum += task.nll_sum(outputs.float(), targets, loss)
        if task.has_accuracy:
            correct += task.correct(outputs, targets)
        units = units + task.units(targets)
    units = torch.as_tensor(units, dtype=torch.float64, device=parts.device)
    sums = sum_across_ranks(torch.stack([loss_sum.double(), nll_sum.double(), correct.double(), units]))
    total_loss, total_nll, total_correct, total_units = sums.tolist()
    count = max(total_units, 1.0)
    accuracy = total_correct / count if task.has_accuracy else None
    nll = total_nll / count if task.kind == "sequence" else None
    return total_loss / count, accuracy, nll


def summarize(spec: Any, state: RunState) -> Summary:
    """Final and best accuracy (and perplexity), and when the target was first reached (training time).

    The target is ``target_accuracy`` (reached at or above it) or, for sequence tasks,
    ``target_perplexity`` (reached at or below it).
    """
    last = state.history[-1]
    summary = Summary(
        epochs=state.epoch, final_batch_size=int(last["batch_size"]), total_train_seconds=state.train_seconds,
        total_eval_seconds=state.eval_seconds, final_test_loss=last["test_loss"])
    accuracies = [h["test_accuracy"] for h in state.history if "test_accuracy" in h]
    if accuracies:
        summary.final_test_accuracy = accuracies[-1]
        summary.best_test_accuracy = max(accuracies)
    perplexities = [h["test_perplexity"] for h in state.history if "test_perplexity" in h]
    if perplexities:
        summary.final_test_perplexity = perplexities[-1]
        summary.best_test_perplexity = min(perplexities)
    reached = None
    if spec.target_accuracy is not None:
        reached = (h for h in state.history if h.get("test_accuracy", -math.inf) >= spec.target_accuracy)
    elif spec.target_perplexity is not None:
        reached = (h for h in state.history if h.get("test_perplexity", math.inf) <= spec.target_perplexity)
    first = next(reached, None) if reached is not None else None
    if first is not None:
        summary.epochs_to_target = int(first["epoch"])
        summary.seconds_to_target = first["train_seconds"]
    return summary


def _lr_for(spec: Any, state: RunState, epoch: int) -> float:
    epoch = min(epoch, spec.epochs)
    return scheduled_lr(spec.schedule, spec.optimizer.base_lr, epoch, spec.epochs) * state.lr_rescale


def _checked_batch_size(value: Any, policy_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RunFailed(f"policy {policy_name!r} returned batch size {value!r}; a policy must return a positive int",
                        reason="bad_policy_output")
    return value


def _scale_on_device(scaler: Any, device: torch.device) -> torch.Tensor:
    """The GradScaler's current scale as a device tensor: ``get_scale()`` would wait for the device
    every step. (Before the first ``scale()`` the scaler holds no tensor yet: its initial value.)"""
    scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
    return scale if scale is not None else torch.full((), scaler.get_scale(), device=device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_line(spec: Any, batch_size: int, lr: float, when: str) -> str:
    from dbx.distributed import world_size

    micro, ranks = spec.max_micro_batch, world_size()
    share = -(-batch_size // ranks)  # the largest rank's slice (the batch itself in one process)
    chunks = -(-share // micro) if micro else 1
    spread = f" ({share} per rank on {ranks})" if ranks > 1 else ""
    accumulation = f", {chunks} micro-batches of <= {micro}" + (" per rank" if ranks > 1 else "") if chunks > 1 else ""
    return f"[{when}] batch size {batch_size}{spread}{accumulation}, lr {lr:.4g}"


def _epoch_line(spec: Any, m: dict[str, float], epoch: int) -> str:
    parts = [f"epoch {epoch:>{len(str(spec.epochs))}}/{spec.epochs}", f"B {int(m['batch_size'])}",
             f"lr {m['lr']:.3g}", f"train loss {m['train_loss']:.4f}"]
    if "train_accuracy" in m:
        parts.append(f"acc {m['train_accuracy']:.4f}")
    parts.append(f"test loss {m['test_loss']:.4f}")
    if "test_accuracy" in m:
        parts.append(f"acc {m['test_accuracy']:.4f}")
    if "test_perplexity" in m:
        parts.append(f"ppl {m['test_perplexity']:.3f}")
    if "diversity" in m:
        parts.append(f"diversity {m['diversity']:.4g}")
    parts.append(f"{m['epoch_seconds']:.2f}s")
    return "  ".join(parts)

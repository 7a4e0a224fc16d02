"""``subsampled``: gradient diversity from m samples drawn at the end of the measuring epoch.

At the end of the epoch, with the weights fixed, the estimator draws ``samples`` = m training
samples without replacement (seeded), computes their per-sample gradient norms and summed
gradient in chunks of ``micro_batch`` (layer hooks where they apply, explicit per-sample gradients
through ``torch.func`` for every other module), and scales the result up to the whole training
set of n samples. Its cost is bounded by m whatever n is, and it works for any model.

Scaling up (``extrapolate: true``, the default). With S1_m = sum ||g_i||^2 and Q_m = ||sum g_i||^2
over the m drawn samples, the unbiased estimates of the full-set sums are

    S1_n = (n / m) S1_m,      Q_n - S1_n = n (n - 1) / (m (m - 1)) * (Q_m - S1_m)

(the second is the sum of g_i . g_j over pairs i != j, estimated from the sample's pairs), and the
value reported is S1_n / Q_n: the diversity of the n training samples, on the same scale as the
``exact`` estimator and as DiveBatch's rule ``B = delta * n * diversity`` expects. When the sampled
gradients cancel so much that Q_n <= 0 (the full gradient is not distinguishable from zero at this
m) the value is ``inf``. ``extrapolate: false`` reports the diversity of the m samples themselves.

The model runs in eval mode during the estimate (BatchNorm uses its running statistics, dropout is
off), so per-sample gradients are those of independent samples, no buffer changes, and the
weights and their ``.grad`` are left untouched.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Literal, Sequence

from dbx.protocols import DiversityEstimate

__all__ = ["SubsampledEstimator", "extrapolate_to_population"]


class SubsampledEstimator:
    """Gradient diversity of the training set from ``samples`` samples at fixed weights.

    Parameters: ``samples`` (m, drawn without replacement at each measuring epoch's end),
    ``micro_batch`` (samples per forward/backward), ``extrapolate`` (report the training set's
    diversity, see the module docstring), ``method`` ("auto": hooks where they apply, torch.func
    elsewhere; "func": torch.func for everything), ``exclude`` (module-path patterns left out),
    ``seed`` (injected by dbx: the run's seed).
    """

    name = "subsampled"

    def __init__(self, *, samples: int = 1024, micro_batch: int = 128, extrapolate: bool = True,
                 method: Literal["auto", "func"] = "auto", exclude: Sequence[str] = (), seed: int = 0) -> None:
        if samples < 2:
            raise ValueError(f"samples must be at least 2, got {samples}")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
        if method not in ("auto", "func"):
            raise ValueError(f"method must be 'auto' or 'func', got {method!r}")
        self.samples = samples
        self.micro_batch = micro_batch
        self.extrapolate = extrapolate
        self.method = method
        self.exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        self.seed = seed
        self._draws = 0  # how many estimates were drawn: each uses fresh samples

    # -- the contract: nothing happens during the steps ----------------------------------------
    def attach(self, model: Any) -> None:
        pass

    def on_backward(self, loss_scale: float) -> None:
        pass

    def on_step(self, loss_scale: float) -> None:
        pass

    def detach(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self._draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._draws = int(state.get("draws", 0))

    def estimate(self, model: Any, loss_fn: Callable[..., Any], data: Any) -> DiversityEstimate:
        import torch

        from dbx.estimators.functional import _func_only, _with_hooks
        from dbx.estimators.hooks import EstimatorConfigError

        start = time.perf_counter()
        n = _length(data)
        m = min(self.samples, n)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self._draws)
        self._draws += 1
        order = torch.randperm(n, generator=generator)[:m]
        device = next(model.parameters()).device
        sum_sq = torch.zeros((), dtype=torch.float64, device=device)
        grad_sum: dict[str, Any] = {}
        per_layer_sq: dict[str, Any] = {}
        was_training = model.training
        model.eval()
        try:
            for s in range(0, m, self.micro_batch):
                inputs, targets = _fetch(data, order[s:s + self.micro_batch], device)
                if self.method == "auto":
                    try:
                        res = _with_hooks(model, loss_fn, inputs, targets, None, self.exclude,
                                          allow_uncovered=True, estimator=self.name)
                    except EstimatorConfigError:  # e.g. a time-major layer: explicit gradients instead
                        self.method = "func"
                if self.method == "func":
                    res = _func_only(model, loss_fn, inputs, targets, None, self.exclude)
                sum_sq += res.total.double().sum()
                for name, g in res.grad_sum.items():
                    grad_sum[name] = g if name not in grad_sum else grad_sum[name] + g
                for key, v in res.per_layer.items():
                    per_layer_sq[key] = v.double().sum() + per_layer_sq.get(key, 0.0)
        finally:
            model.train(was_training)
        sq_of_sum = torch.stack([g.square().sum(dtype=torch.float64) for g in grad_sum.values()]).sum()
        s1_m, q_m = torch.stack([sum_sq, sq_of_sum]).tolist()
        if self.extrapolate:
            s1, q = extrapolate_to_population(s1_m, q_m, m, n)
        else:
            s1, q = s1_m, q_m
        return DiversityEstimate(
            value=_ratio(s1, q),
            samples=n if self.extrapolate else m,  # the set the value (and its sums) describe
            seconds=time.perf_counter() - start,
            sum_sq_norms=s1,
            sq_norm_of_sum=q,
        )


def extrapolate_to_population(sum_sq: float, sq_of_sum: float, m: int, n: int) -> tuple[float, float]:
    """Unbiased estimates of (sum ||g_i||^2, ||sum g_i||^2) over n samples from m drawn without replacement."""
    if m >= n:
        return sum_sq, sq_of_sum
    s1 = sum_sq * n / m
    cross = (sq_of_sum - sum_sq) * n * (n - 1) / (m * (m - 1))
    return s1, s1 + cross


def _ratio(sum_sq: float, sq_of_sum: float) -> float:
    if sq_of_sum > 0:
        return sum_sq / sq_of_sum
    return math.inf if sum_sq > 0 else math.nan


def _length(data: Any) -> int:
    if isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape"):
        return int(data[0].shape[0])
    return len(data)


def _fetch(data: Any, index: Any, device: Any) -> tuple[Any, Any]:
    """Samples ``index`` of a training split (a pair of tensors or a Dataset), on ``device``."""
    import torch
    from torch.utils.data import default_collate

    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        inputs, targets = data
        return inputs[index.to(inputs.device)].to(device), targets[index.to(targets.device)].to(device)
    batch = default_collate([data[i] for i in index.tolist()])
    inputs, targets = batch[0], batch[1]
    return inputs.to(device), targets.to(device)

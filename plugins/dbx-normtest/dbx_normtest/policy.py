"""``normtest``: grow the batch when the gradient's sample variance swamps its mean (Byrd et al. 2012).

Byrd, Chin, Nocedal and Wu, "Sample size selection in optimization methods for machine learning"
(Mathematical Programming 134, 2012), accept a batch S when its gradient estimate is accurate
enough to be a descent direction, which they ensure with the *norm test*:

    Var_S / |S|  <=  theta^2 * ||g_S||^2,

where g_S is the mean gradient and Var_S = sum over coordinates of the sample variance of the
per-sample gradients (the trace of the sample covariance). When the test fails, the next batch is
the smallest one that would pass it:

    |S_next| = ceil( Var_S / (theta^2 * ||g_S||^2) ).

This policy applies the test after each measured epoch, with the statistics of that epoch's m
per-sample gradients, which dbx's estimators report as S1 = sum ||g_i||^2
(``sum_sq_norms``) and ||S2||^2 = ||sum g_i||^2 (``sq_norm_of_sum``):

    Var     = (S1 - ||S2||^2 / m) / (m - 1)
    ||g||^2 = ||S2||^2 / m^2

So it depends on more than the diversity ratio, and needs an estimator that reports both sums
(``exact``, ``layerwise``, ``subsampled``). The batch never shrinks (as in Byrd et al.) and stays
within ``max``; a mean gradient of exactly zero fails every test, so it asks for ``max``.
``theta`` in (0, 1): smaller asks for a more accurate gradient, hence larger batches.

This module imports only dbx's public API (``dbx.protocols``).
"""
from __future__ import annotations

import math
from typing import Any

from dbx.protocols import DiversityEstimate, EpochState

__all__ = ["NormTest", "gradient_statistics"]


def gradient_statistics(diversity: DiversityEstimate) -> tuple[float, float]:
    """``(Var, ||g||^2)``: the trace of the per-sample gradients' sample covariance and the squared
    norm of their mean, from an estimate's sums. Raises ValueError if the estimate has no sums."""
    if diversity.sum_sq_norms is None or diversity.sq_norm_of_sum is None:
        raise ValueError(
            "normtest needs the estimate's sum_sq_norms and sq_norm_of_sum (the per-sample statistics), but the "
            "estimator did not report them; use estimator: {name: exact} (or layerwise, subsampled)")
    m, s1, q = diversity.samples, diversity.sum_sq_norms, diversity.sq_norm_of_sum
    variance = max(0.0, (s1 - q / m) / (m - 1))
    return variance, q / (m * m)


class NormTest:
    """Grow the batch to the smallest size that passes Byrd et al.'s norm test.

    Parameters (``policy.params`` in a spec): ``initial`` (first batch size), ``max`` (upper
    bound), ``theta`` (the test's tolerance, in (0, 1)), ``measure_every`` (test every k-th epoch).
    """

    uses_diversity = True

    def __init__(self, *, initial: int = 128, max: int = 4096, theta: float = 0.9, measure_every: int = 1) -> None:
        for name, value in (("initial", initial), ("max", max), ("measure_every", measure_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if initial > max:
            raise ValueError(f"initial ({initial}) must be at most max ({max})")
        if not 0.0 < theta < 1.0:
            raise ValueError(f"theta must be in (0, 1), got {theta!r}")
        self.initial, self.max, self.theta, self.measure_every = initial, max, float(theta), measure_every

    def initial_batch_size(self) -> int:
        return self.initial

    def measures_in(self, epoch: int) -> bool:
        return epoch % self.measure_every == 0

    def next_batch_size(self, state: EpochState, diversity: DiversityEstimate | None) -> int:
        current = state.batch_size
        if diversity is None or diversity.samples < 2:
            return current  # not measured, or nothing to estimate a variance from
        variance, mean_sq = gradient_statistics(diversity)
        if not (math.isfinite(variance) and math.isfinite(mean_sq)):
            return current
        if mean_sq <= 0.0:
            return self.max if variance > 0 else current
        if variance / current <= self.theta ** 2 * mean_sq:
            return current  # the test passes: this batch's gradient is accurate enough
        needed = math.ceil(variance / (self.theta ** 2 * mean_sq))
        return min(max(needed, current), self.max)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the rule reads only the epoch's state and estimate

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

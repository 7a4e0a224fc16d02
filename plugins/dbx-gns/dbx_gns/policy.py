"""``gns``: the batch size follows the gradient noise scale (McCandlish, Kaplan, Amodei et al. 2018).

McCandlish et al., "An Empirical Model of Large-Batch Training" (arXiv 1812.06162), show that the
batch size beyond which larger batches stop paying off is about the *simple noise scale*

    B_simple = tr(Sigma) / ||G||^2,

with G the true gradient and Sigma the covariance of the per-sample gradients. Below it, doubling
the batch nearly halves the steps needed; above it, it mostly wastes samples. As the loss falls,
||G|| shrinks faster than the noise, B_simple grows, and so should the batch.

dbx already measures what B_simple needs. Its estimators report the gradient diversity of m
per-sample gradients, ``d = sum_i ||g_i||^2 / ||sum_i g_i||^2``, and (dbx's docs/algorithm.md)

    m * d = 1 + B_simple                     (to first order in 1/m)

Exactly: with S1 = sum ||g_i||^2 and Q = ||sum g_i||^2, the unbiased estimates are
||G||^2 ~ (Q - S1) / (m (m - 1)) and tr(Sigma) ~ (m S1 - Q) / (m (m - 1)), so

    B_simple ~ (m S1 - Q) / (Q - S1) = (m d - 1) / (1 - d),

which is ``m d - 1`` when d << 1 (always, for an estimate over an epoch) and needs only the
estimate's ``value`` and ``samples``. When d >= 1 the gradient cannot be told from zero at this
sample size (the noise dominates), and the noise scale is taken as infinite.

The rule, after each measured epoch:

1. ``B_simple`` from the estimate, as above;
2. exponential smoothing across measurements: ``s <- smoothing * s + (1 - smoothing) * B_simple``
   (the first measurement sets ``s``); an infinite noise scale is not smoothed in: it asks for
   ``max`` at once, and a NaN estimate (nothing measured) is ignored;
3. target ``multiplier * s``, rounded and clipped to ``[min, max]``;
4. hysteresis: the batch changes only if the target differs from it by at least ``min_change``
   (relative), so that the estimate's jitter does not resize the loader every epoch.

The batch can shrink as well as grow (down to ``min``, by default the initial size). The spec's
``lr_scaling`` applies whenever it changes, as for every policy.

This module imports only dbx's public API (``dbx.protocols``).
"""
from __future__ import annotations

import math
from typing import Any

from dbx.protocols import DiversityEstimate, EpochState

__all__ = ["GradientNoiseScale", "noise_scale"]


def noise_scale(diversity: DiversityEstimate) -> float | None:
    """B_simple = tr(Sigma) / ||G||^2 from a diversity estimate; ``inf`` if the noise dominates, None if unknown.

    ``(m d - 1) / (1 - d)`` with d = ``diversity.value`` over m = ``diversity.samples`` per-sample
    gradients (about ``m d - 1``); never negative.
    """
    m, d = diversity.samples, diversity.value
    if m < 2 or math.isnan(d):
        return None
    if d >= 1.0:  # includes inf: the summed gradient is not distinguishable from zero
        return math.inf
    return max(0.0, (m * d - 1.0) / (1.0 - d))


class GradientNoiseScale:
    """Batch size = ``multiplier`` x the smoothed gradient noise scale, within ``[min, max]``.

    Parameters (``policy.params`` in a spec):

    - ``initial``: batch size of the first epoch(s), until a measurement says otherwise;
    - ``min`` / ``max``: bounds on the batch size (``min`` defaults to ``initial``: the batch
      never goes below where it started; set it lower to let the batch shrink);
    - ``multiplier``: batch size per unit of noise scale (McCandlish et al.'s B_crit ~ B_noise
      suggests 1; larger trades more samples for fewer steps);
    - ``smoothing``: weight of the past in the exponential average of the noise scale, in [0, 1)
      (0: follow each measurement);
    - ``min_change``: smallest relative change worth a resize, in [0, 1) (0.1: ignore targets
      within 10% of the current batch size);
    - ``measure_every``: measure every k-th epoch (each measured epoch costs the estimator's
      overhead; 1 measures every epoch).
    """

    uses_diversity = True

    def __init__(self, *, dataset_size: int, initial: int = 128, min: int | None = None, max: int = 4096,
                 multiplier: float = 1.0, smoothing: float = 0.5, min_change: float = 0.1,
                 measure_every: int = 1) -> None:
        lower = initial if min is None else min
        for name, value in (("dataset_size", dataset_size), ("initial", initial), ("min", lower), ("max", max),
                            ("measure_every", measure_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not lower <= initial <= max:
            raise ValueError(f"need min <= initial <= max, got min={lower}, initial={initial}, max={max}")
        if not (math.isfinite(multiplier) and multiplier > 0):
            raise ValueError(f"multiplier must be a finite number > 0, got {multiplier!r}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        if not 0.0 <= min_change < 1.0:
            raise ValueError(f"min_change must be in [0, 1), got {min_change!r}")
        self.dataset_size = dataset_size
        self.initial, self.min, self.max = initial, lower, max
        self.multiplier = float(multiplier)
        self.smoothing = float(smoothing)
        self.min_change = float(min_change)
        self.measure_every = measure_every
        self.smoothed: float | None = None  # the exponential average of B_simple (None before the first)

    def initial_batch_size(self) -> int:
        return self.initial

    def measures_in(self, epoch: int) -> bool:
        return epoch % self.measure_every == 0

    def next_batch_size(self, state: EpochState, diversity: DiversityEstimate | None) -> int:
        current = state.batch_size
        if diversity is None:
            return current
        measured = noise_scale(diversity)
        if measured is None:
            return current
        if math.isinf(measured):
            target = float(self.max)
        else:
            if self.smoothed is None:
                self.smoothed = measured
            else:
                self.smoothed = self.smoothing * self.smoothed + (1.0 - self.smoothing) * measured
            target = self.multiplier * self.smoothed
        proposed = int(round(min(max(target, self.min), self.max)))
        if abs(proposed - current) < self.min_change * current:
            return current
        return proposed

    def state_dict(self) -> dict[str, Any]:
        return {"smoothed": self.smoothed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.smoothed = state["smoothed"]


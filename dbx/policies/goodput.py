"""Goodput: the batch size that makes the most training progress per second *on this machine*.

DiveBatch asks how large a batch is statistically efficient; it never asks how fast a batch size
runs. Pollux (Qiao et al., "Pollux: Co-adaptive Cluster Scheduling for Goodput-Optimized Deep
Learning", OSDI 2021) asks both: it maximises

    GOODPUT(B) = THROUGHPUT(B) x EFFICIENCY(B)

where the throughput is measured (samples per second) and the efficiency is the progress a
sample makes at batch size B relative to a sample at the small batch B0. This policy does the
same on one device, with dbx's per-sample gradient norms as the noise estimate and the loop's
measured ``EpochState.throughput`` as the speed.

Use it with the ``subsampled`` estimator (``estimator: {name: subsampled, params: {samples:
2048}}``): the noise scale is a property of the gradients at one point, and ``subsampled`` takes
its m samples at the fixed weights of the epoch's end. The ``exact`` estimator sums over an
epoch of moving weights, where the steps' gradients also turn and cancel; the formula below then
overstates the noise scale by orders of magnitude early in training (MNIST, small CNN, after one
epoch at B = 32: about 160,000 from ``exact``, 560 to 800 from ``subsampled``), and goodput would
jump straight to ``max``.

The gradient noise scale from the diversity (the exact identity)
----------------------------------------------------------------
Let the m per-sample gradients g_i of an epoch have mean G and covariance Sigma, and let
S1 = sum_i ||g_i||^2, ||S2||^2 = ||sum_i g_i||^2 and D = S1 / ||S2||^2 (the gradient diversity;
``DiversityEstimate`` carries all three and m). Then E[S1] = m (||G||^2 + tr Sigma) and
E[||S2||^2] = m^2 ||G||^2 + m tr Sigma, so

    ||G||^2  ~  (||S2||^2 - S1) / (m (m - 1))          tr Sigma  ~  (S1 - ||S2||^2 / m) / (m - 1)

are unbiased. These are exactly the estimators of McCandlish, Kaplan, Amodei et al., "An
Empirical Model of Large-Batch Training" (arXiv:1812.06162, Appendix A.1) with B_small = 1 and
B_big = m. Their ratio is the "simple" noise scale B_simple = tr Sigma / ||G||^2 of that paper:

    B_simple = (m S1 - ||S2||^2) / (||S2||^2 - S1) = (m D - 1) / (1 - D)
    equivalently  D = (1 + B_simple) / (m + B_simple).

So ``n * diversity = 1 + B_simple`` (the relation DiveBatch's docstring uses) holds only to
first order, when B_simple << n: at D = 0.258 over n = 10,000 samples, n D - 1 = 2,579 while
B_simple = 3,475. A diversity of 1 or more (or an infinite one: the summed gradient vanished)
means the noise dominates: B_simple = inf, every batch size is fully efficient. The
``subsampled`` estimator's extrapolated sums (``samples`` = n) give the same B_simple as its m
drawn samples do, so the formula applies to what it reports as it is.

Efficiency, throughput, and the optimum
---------------------------------------
McCandlish et al. show that a step at batch size B (with its best learning rate) makes the
progress of ``1 / (1 + B_noise / B)`` of a noiseless step; per sample, relative to batch B0,
that is Pollux's efficiency (its Eq. for EFFICIENCY_t, with phi_t the noise scale):

    E(B) = (B_simple + B0) / (B_simple + B)               (1 at B = B0, falling as B grows)

The step time is fitted to the measured table (per batch size, its fastest epoch: see
``dbx.train.throughput``) as T(B) = a + b B (a: the fixed cost of a step, b: the cost per
sample), by least squares in relative error with a, b >= 0, refitted after every epoch;
THROUGHPUT(B) = B / T(B). For a batch size already trained, the measured throughput is used
instead of the fit. With that model the goodput E(B) B / T(B) has one maximum,

    B* = sqrt(B_simple * a / b),

the geometric mean of the noise scale and a / b (the batch size at which a step's fixed cost
equals its per-sample cost). DiveBatch picks about delta (1 + B_simple) instead. So goodput
picks a smaller batch than DiveBatch when a / b < delta^2 B_simple (throughput that saturates
early: a big model on a small device) and a larger one when a / b > delta^2 B_simple (throughput
that keeps growing: a small model, or a GPU with room to spare).

The decision after each epoch (``next_batch_size``)
---------------------------------------------------
1. A measuring epoch (every ``measure_every`` epochs, starting with the first) updates the noise
   estimate: the two unbiased terms above, each an exponential moving average with weight
   ``smoothing`` on the old value (0: use the latest epoch only), and B_simple their ratio.
2. The candidates are every batch size in the throughput table (at their measured throughput)
   and, from the fit, B*, ``min`` and ``max``, each clipped to the trust region: at most
   ``probe_factor`` times beyond the measured sizes (``[smallest / f, largest x f]``), because
   a straight line fitted to a few noisy timings says little far from them. The one with the
   highest predicted goodput wins. So B grows (or shrinks) by at most ``probe_factor`` per epoch
   into untried sizes, and each step adds a measurement to the fit.
3. Hysteresis: B changes only if the winner's predicted goodput beats the current size's by more
   than ``hysteresis`` (a fraction). Near its optimum the goodput curve is flat, so a noisy
   estimate does not make B swing back and forth.
4. With one batch size measured, a and b cannot both be fitted; as in AdaptDL (Pollux's
   implementation), half of the measured step is then assumed to be fixed cost. If that prior
   keeps B where it is, the next epoch is a probe at ``probe_factor`` x B (or B / ``probe_factor``
   at ``max``), once, so that the fit gets its second point.
5. Until the first estimate, and when the table is empty (a hand-built ``EpochState``), B stays.

The learning rate follows the spec's ``lr_scaling`` rule, as for every policy. McCandlish's model
assumes the best lr at each B, which grows with B below the noise scale and stops growing above
it; ``adascale: true`` applies that rule itself, as Pollux does with AdaScale (Johnson, Agrawal,
Gu and Guestrin, "AdaScale SGD", ICML 2020): the lr gain of batch size B over B0 is
``(B / B0) E(B)`` (linear while B << B_simple, at most ``1 + B_simple / B0``), and when B changes
the lr is multiplied by the ratio of the new gain to the old one at the current noise scale
(``lr_factor``; set ``lr_scaling: none`` then, or both apply). B may shrink as well as grow,
within [min, max].

Logged through ``metrics()`` as ``policy/<key>`` after each decision: ``noise_scale``
(B_simple; left out while it is infinite), ``efficiency`` (E of the chosen B), ``predicted_throughput`` (samples/s),
``predicted_goodput`` (throughput x efficiency: B0-equivalent samples per second),
``step_fixed_seconds`` (a) and ``step_seconds_per_sample`` (b), and ``probe`` (1 when the next
epoch is a probe). The run's ``throughput.json`` artifact holds the measured table.

Because the throughput is measured, the batch sizes this policy picks depend on the machine and
its load: two runs of one spec can differ. Given the same inputs, its choices are deterministic,
and a resumed run continues exactly (the loop restores the throughput table with the checkpoint).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dbx.policies._checks import at_least, positive_int
from dbx.protocols import DiversityEstimate, EpochState


class Goodput:
    """Pick the B in [min, max] that maximises measured throughput x statistical efficiency.

    Parameters (all keyword-only):

    - ``initial``: the batch size of the first epoch, and B0 of the efficiency E(B).
    - ``min``, ``max``: the range of batch sizes (``min`` defaults to ``initial``).
    - ``measure_every``: measure the diversity in epochs 1, 1 + k, 1 + 2k, ... (each measuring
      epoch costs the estimator's overhead: about 1.1x a plain epoch with ``exact`` on a CPU).
    - ``hysteresis``: the predicted gain (a fraction, e.g. 0.05 for 5 %) a change must bring.
    - ``smoothing``: in [0, 1), the weight of the old noise estimate in its moving average.
    - ``probe_factor``: > 1, how far beyond the measured batch sizes an untried one may be (the
      trust region of the step-time fit), and how far the one probe epoch moves B when the fit is
      underdetermined (one batch size measured) and the prior would keep B.
    - ``adascale``: rescale the lr by AdaScale's gain ratio when B changes (module docstring).
    """

    uses_diversity = True

    def __init__(self, *, initial: int = 128, min: int | None = None, max: int = 2048,
                 measure_every: int = 1, hysteresis: float = 0.05, smoothing: float = 0.0,
                 probe_factor: float = 2.0, adascale: bool = False) -> None:
        self.initial = positive_int("initial", initial)
        self.min = positive_int("min", min) if min is not None else self.initial
        self.max = at_least("max", positive_int("max", max), "initial", initial)
        if self.min > self.initial:
            raise ValueError(f"min ({self.min}) must be at most initial ({self.initial})")
        self.measure_every = positive_int("measure_every", measure_every)
        self.hysteresis = _number("hysteresis", hysteresis, low=0.0)
        self.smoothing = _number("smoothing", smoothing, low=0.0, high=1.0)
        self.probe_factor = _number("probe_factor", probe_factor, low=1.0, low_open=True)
        if not isinstance(adascale, bool):
            raise ValueError(f"adascale must be true or false, got {adascale!r}")
        self.adascale = adascale
        self.batch_size = self.initial
        self.grad_sq: float | None = None  # moving averages of the unbiased ||G||^2 and tr(Sigma)
        self.trace: float | None = None
        self.probed = False
        self._metrics: dict[str, float] = {}

    # -- the protocol -----------------------------------------------------------------------------
    def initial_batch_size(self) -> int:
        return self.initial

    def measures_in(self, epoch: int) -> bool:
        return (epoch - 1) % self.measure_every == 0

    def next_batch_size(self, state: EpochState, diversity: DiversityEstimate | None) -> int:
        self.batch_size = state.batch_size
        self._metrics = {}
        if diversity is not None:
            self._observe(diversity)
        phi = self.noise_scale()
        model = fit_step_time(state.throughput)
        if phi is None or model is None:
            return state.batch_size
        table = {b: t for b, t in state.throughput.items() if t > 0}

        def goodput(batch: int) -> float:
            return efficiency(phi, batch, self.initial) * throughput_of(batch, table, model)

        current = state.batch_size
        low = max(self.min, math.ceil(min(table) / self.probe_factor))  # the fit's trust region
        high = min(self.max, math.floor(max(table) * self.probe_factor))
        untried = {self.min, self.max, optimal_batch_size(phi, *model, self.max)}
        candidates = {current} | {b for b in table if self.min <= b <= self.max}
        candidates |= {int(min(max(round(b), low), high)) for b in untried if not math.isnan(b)}
        best = max(sorted(candidates), key=goodput)  # sorted: ties go to the smallest, deterministically
        if goodput(best) <= (1.0 + self.hysteresis) * goodput(current):
            best = current
        probe = len(table) == 1 and best == current and not self.probed
        if probe:
            best = self._probe_size(current)
            self.probed = best != current
        self.batch_size = best
        self._metrics = {"efficiency": efficiency(phi, best, self.initial), "predicted_goodput": goodput(best),
                         "predicted_throughput": throughput_of(best, table, model),
                         "step_fixed_seconds": model[0], "step_seconds_per_sample": model[1],
                         "probe": float(probe and self.probed)}
        if math.isfinite(phi):
            self._metrics["noise_scale"] = phi
        return best

    def lr_factor(self, old: int, new: int) -> float:
        """With ``adascale``: gain(new) / gain(old), gain(B) = (B / B0) E(B); else 1 (the spec's rule only)."""
        phi = self.noise_scale()
        if not self.adascale or phi is None:
            return 1.0
        if math.isinf(phi):
            return new / old
        return (new / (phi + new)) / (old / (phi + old))

    def metrics(self) -> dict[str, float]:
        """The numbers behind the last decision (dbx logs each as ``policy/<key>``)."""
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "grad_sq": self.grad_sq, "trace": self.trace,
                "probed": self.probed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_size = int(state["batch_size"])
        self.grad_sq = None if state["grad_sq"] is None else float(state["grad_sq"])
        self.trace = None if state["trace"] is None else float(state["trace"])
        self.probed = bool(state["probed"])

    # -- the noise scale --------------------------------------------------------------------------
    def noise_scale(self) -> float | None:
        """B_simple = tr(Sigma) / ||G||^2 from the averaged estimates (inf: noise dominates)."""
        if self.grad_sq is None or self.trace is None:
            return None
        return self.trace / self.grad_sq if self.grad_sq > 0 else math.inf

    def _observe(self, estimate: DiversityEstimate) -> None:
        terms = noise_terms(estimate)
        if terms is None:
            return
        grad_sq, trace = terms
        if self.grad_sq is None or self.trace is None:
            self.grad_sq, self.trace = grad_sq, trace
            return
        keep = self.smoothing
        self.grad_sq = keep * self.grad_sq + (1.0 - keep) * grad_sq
        self.trace = keep * self.trace + (1.0 - keep) * trace

    # -- helpers ----------------------------------------------------------------------------------
    def _clip(self, batch: float) -> int:
        return int(min(max(round(batch), self.min), self.max)) if math.isfinite(batch) else self.max

    def _probe_size(self, current: int) -> int:
        up = self._clip(current * self.probe_factor)
        return up if up != current else self._clip(current / self.probe_factor)


def noise_terms(estimate: DiversityEstimate) -> tuple[float, float] | None:
    """Unbiased (||G||^2, tr Sigma) from an epoch's sums (module docstring); None if unusable.

    An estimate without the sums gives them up to a common scale from its value alone
    (S1 = D, ||S2||^2 = 1), which leaves their ratio, the noise scale, exactly as it is.
    """
    m = estimate.samples
    if m < 2:
        return None
    if estimate.sum_sq_norms is not None and estimate.sq_norm_of_sum is not None:
        s1, s2 = float(estimate.sum_sq_norms), float(estimate.sq_norm_of_sum)
    else:
        s1, s2 = float(estimate.value), 1.0
    if math.isnan(s1) or math.isnan(s2):
        return None
    if math.isinf(s1) or s2 <= 0:  # the summed gradient vanished: noise dominates
        return 0.0, 1.0
    return (s2 - s1) / (m * (m - 1)), (s1 - s2 / m) / (m - 1)


def efficiency(noise_scale: float, batch_size: float, reference: float) -> float:
    """E(B) = (B_simple + B0) / (B_simple + B): a sample's progress at B relative to one at B0."""
    if math.isinf(noise_scale):
        return 1.0
    return (noise_scale + reference) / (noise_scale + batch_size)


def fit_step_time(throughput: Mapping[int, float]) -> tuple[float, float] | None:
    """(a, b) of the step time T(B) = a + b B fitted to ``{B: samples/s}``; None without data.

    Least squares weighted by 1 / T^2 (relative error, so small and large steps count alike),
    with a, b >= 0 (a negative one is set to 0 and the other refitted). With one batch size the
    fit is underdetermined: half of its step is taken as fixed cost (AdaptDL's prior).
    """
    points = [(float(b), b / s) for b, s in sorted(throughput.items()) if s > 0 and math.isfinite(s)]
    if not points:
        return None
    if len({b for b, _ in points}) == 1:
        b, t = points[0]
        return t / 2, t / (2 * b)
    w = [1.0 / (t * t) for _, t in points]
    sw = sum(w)
    sb = sum(wi * b for wi, (b, _) in zip(w, points))
    sbb = sum(wi * b * b for wi, (b, _) in zip(w, points))
    st = sum(wi * t for wi, (_, t) in zip(w, points))
    sbt = sum(wi * b * t for wi, (b, t) in zip(w, points))
    det = sw * sbb - sb * sb
    fixed, per_sample = (sbb * st - sb * sbt) / det, (sw * sbt - sb * st) / det
    if fixed < 0:
        return 0.0, sbt / sbb
    if per_sample < 0:
        return st / sw, 0.0
    return fixed, per_sample


def optimal_batch_size(noise_scale: float, fixed: float, per_sample: float, largest: float) -> float:
    """B* = sqrt(B_simple a / b), the maximum of E(B) B / (a + b B); ``largest`` when unbounded."""
    if math.isinf(noise_scale) or per_sample <= 0:
        return float(largest)
    return math.sqrt(max(noise_scale, 0.0) * fixed / per_sample)


def throughput_of(batch: int, measured: Mapping[int, float], model: tuple[float, float]) -> float:
    """Samples per second at ``batch``: measured if it was trained, else from the fitted step time."""
    if batch in measured:
        return measured[batch]
    fixed, per_sample = model
    return batch / (fixed + per_sample * batch)


def _number(name: str, value: float, *, low: float, high: float | None = None, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
        raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}")
    return float(value)

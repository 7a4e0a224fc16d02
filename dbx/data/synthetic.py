"""Synthetic tasks: the logistic-regression problem of DiveBatch's prototype, and a linear variant.

docs/algorithm.md ("The synthetic task"), after the DiveBatch authors' prototype: n = 20,000 samples, d = 512 features uniform in [-1, 1],
a Gaussian true weight vector, and labels from the sign of the logit with small noise. The paper's
exact noise model is not recoverable; here it is Gaussian noise of standard deviation ``noise``
added to the *standardised* logit ``z = sqrt(3) <x, w> / ||w||`` (``z`` has unit variance given
``w``, since each feature has variance 1/3), so ``noise`` reads the same for every d: with
``P(flip) = arctan(noise) / pi``, 0.05 flips about 1.6 % of the labels, 1.0 about a quarter.

Everything is drawn from one CPU ``torch.Generator`` seeded with ``data_seed`` (default: the run's
``seed``), so the same seed gives bit-identical data on every machine.
"""
from __future__ import annotations

import math

import torch

from dbx.errors import UserError
from dbx.protocols import DataSplits

__all__ = ["synthetic_logistic", "synthetic_linear"]


def _draw_features(n: int, d: int, noise: float, test_fraction: float, generator: torch.Generator):
    if n < 2 or d < 1:
        raise UserError(f"synthetic data needs n >= 2 and d >= 1, got n={n}, d={d}")
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    if noise < 0:
        raise UserError(f"noise must be >= 0, got {noise}")
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    weights = torch.randn(d, generator=generator, dtype=torch.float64)
    x = torch.rand(n, d, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    z = x @ weights * (math.sqrt(3.0) / weights.norm())  # standardised logit: unit variance
    eps = torch.randn(n, generator=generator, dtype=torch.float64)
    return x.float(), z, eps, n - n_test


def synthetic_logistic(
    *,
    n: int = 20000,
    d: int = 512,
    noise: float = 0.05,
    test_fraction: float = 0.2,
    seed: int = 0,
    data_seed: int | None = None,
) -> DataSplits:
    """Binary classification: ``y = 1[z + noise * eps > 0]``, ``x ~ U[-1, 1]^d``, ``w ~ N(0, I)``.

    ``n`` counts all samples; the last ``round(n * test_fraction)`` form the test split. Inputs are
    float32 of shape ``(n, d)``, targets int64 in {0, 1}; ``num_classes`` is 2 (cross-entropy over
    two logits). ``seed`` is the run's seed (injected by dbx); ``data_seed`` fixes the data
    independently of the run seed, e.g. to vary only the initialisation across a sweep.
    """
    generator = torch.Generator().manual_seed(seed if data_seed is None else data_seed)
    x, z, eps, n_train = _draw_features(n, d, noise, test_fraction, generator)
    y = (z + noise * eps > 0).long()
    return DataSplits(
        train=(x[:n_train], y[:n_train]),
        test=(x[n_train:], y[n_train:]),
        num_classes=2,
        input_shape=(d,),
        description=f"synthetic logistic regression: n={n}, d={d}, noise={noise}",
    )


def synthetic_linear(
    *,
    n: int = 20000,
    d: int = 512,
    noise: float = 0.05,
    test_fraction: float = 0.2,
    seed: int = 0,
    data_seed: int | None = None,
) -> DataSplits:
    """Regression: ``y = z + noise * eps`` with the same ``x``, ``w`` and ``z`` as the logistic task.

    Targets are float32 of shape ``(n, 1)`` and ``num_classes`` is None, so dbx trains with mean
    squared error and reports no accuracy. The best achievable test MSE is ``noise**2``.
    """
    generator = torch.Generator().manual_seed(seed if data_seed is None else data_seed)
    x, z, eps, n_train = _draw_features(n, d, noise, test_fraction, generator)
    y = (z + noise * eps).float().unsqueeze(1)
    return DataSplits(
        train=(x[:n_train], y[:n_train]),
        test=(x[n_train:], y[n_train:]),
        num_classes=None,
        input_shape=(d,),
        description=f"synthetic linear regression: n={n}, d={d}, noise={noise}",
    )

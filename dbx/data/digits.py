"""scikit-learn's bundled handwritten digits: 1,797 images of 8x8 pixels, 10 classes.

Real image data that is always available (it ships inside scikit-learn) and trains in seconds:
the dataset of choice for tests and demos that must not depend on files on disk.
"""
from __future__ import annotations

import torch

from dbx.errors import UserError
from dbx.protocols import DataSplits

__all__ = ["digits"]


def digits(*, seed: int = 0, test_fraction: float = 0.2, data_seed: int | None = None) -> DataSplits:
    """Inputs ``(1, 8, 8)`` float32 scaled to [0, 1] then standardised (mean 0, std 1 over the
    training pixels); labels int64 in 0..9. The train/test split is a seeded shuffle
    (``data_seed``, default the run's ``seed``), ``test_fraction`` of the samples going to test.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise UserError("the digits dataset needs scikit-learn: pip install scikit-learn") from exc
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed if data_seed is None else data_seed)
    order = torch.randperm(len(y), generator=generator)
    n_test = round(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return DataSplits(train=(x[train], y[train]), test=(x[test], y[test]), num_classes=10, input_shape=(1, 8, 8),
                      description="scikit-learn digits (8x8)")

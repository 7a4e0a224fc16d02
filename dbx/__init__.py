"""dbx: train PyTorch models with an adaptive batch size, and record every run in MLflow.

Importing dbx is cheap on purpose: torch and mlflow are imported only by the commands that need
them, so ``dbx --help`` and ``dbx validate`` answer at once.

The public API for your own training loop (docs/your-loop.md); each name loads on first use:

- ``DiversityMeter(model, ...)``, ``MeterError``: exact gradient diversity over an epoch's steps
  (``dbx.meter``);
- ``per_sample_sq_norms(model, loss_fn, inputs, targets)``, ``PerSampleSqNorms``: the squared
  per-sample gradient norms of one batch (``dbx.estimators.functional``);
- ``build_policy(name, params, dataset_size=n)``, ``AdaptiveBatchSize``, ``Resize``,
  ``PolicyError``: the batch-size policies ``dbx run`` uses, standalone (``dbx.adaptive``);
- ``DiversityEstimate``, ``EpochState``: the records policies read (``dbx.protocols``);
- ``log_diversity(meter, step=epoch)``: the meter's values into the active MLflow run.

Integrations (optional extras): ``dbx.integrations.lightning`` (``pip install dbx[lightning]``)
and ``dbx.integrations.transformers`` (``pip install dbx[transformers]``).
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "DiversityMeter",
    "MeterError",
    "per_sample_sq_norms",
    "PerSampleSqNorms",
    "build_policy",
    "AdaptiveBatchSize",
    "Resize",
    "PolicyError",
    "DiversityEstimate",
    "EpochState",
    "log_diversity",
]

_LAZY = {
    "DiversityMeter": "dbx.meter",
    "MeterError": "dbx.meter",
    "per_sample_sq_norms": "dbx.estimators.functional",
    "PerSampleSqNorms": "dbx.estimators.functional",
    "build_policy": "dbx.adaptive",
    "AdaptiveBatchSize": "dbx.adaptive",
    "Resize": "dbx.adaptive",
    "PolicyError": "dbx.adaptive",
    "DiversityEstimate": "dbx.protocols",
    "EpochState": "dbx.protocols",
    "log_diversity": "dbx.tracking",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dbx' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))

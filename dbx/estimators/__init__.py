"""Gradient-diversity estimators (entry-point group ``dbx.estimators``) and per-sample norm kernels.

Built-ins, registered in dbx's setup.cfg like any third-party plugin:

- ``exact`` (``dbx.estimators.exact.ExactEstimator``): every sample of the measuring epoch, norms
  from the training step's own backward through layer hooks;
- ``subsampled`` (``dbx.estimators.subsampled.SubsampledEstimator``): m samples drawn at the end of
  the epoch at fixed weights, any model;
- ``layerwise`` (``dbx.estimators.layerwise.LayerwiseEstimator``): diversity per layer and combined,
  optionally restricted to some layers.

``per_sample_sq_norms(model, loss_fn, inputs, targets)`` gives the B squared per-sample gradient
norms of a batch (and their per-layer shares) outside training.

Importing this package does not import torch: the names below load on first use.
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "per_sample_sq_norms",
    "per_sample_grads_func",
    "PerSampleSqNorms",
    "ExactEstimator",
    "SubsampledEstimator",
    "LayerwiseEstimator",
]

_LAZY = {
    "per_sample_sq_norms": "dbx.estimators.functional",
    "per_sample_grads_func": "dbx.estimators.functional",
    "PerSampleSqNorms": "dbx.estimators.functional",
    "ExactEstimator": "dbx.estimators.exact",
    "SubsampledEstimator": "dbx.estimators.subsampled",
    "LayerwiseEstimator": "dbx.estimators.layerwise",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dbx.estimators' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))

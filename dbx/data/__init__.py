"""Datasets (registered as ``dbx.datasets`` plugins) and the resizable batch loader.

Importing this package is cheap: torch is imported inside the functions that need it, so that
``dbx validate`` can resolve data roots without paying for torch.

- ``resolve_root(root)``: where a dataset's files live (spec's ``data.root`` -> ``$DBX_DATA_ROOT``
  -> ``~/data``).
- ``take_subset(splits, n, seed)``: the spec's ``data.subset``, a fixed seeded subset of the
  training split.
- ``dbx.data.loader.make_loader``: batches of a split at a batch size that may change between epochs.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from dbx.errors import UserError

if TYPE_CHECKING:
    from dbx.protocols import DataSplits

__all__ = ["DATA_ROOT_ENV", "resolve_root", "take_subset", "split_size"]

#: Environment variable naming the data root when a spec leaves ``data.root`` null.
DATA_ROOT_ENV = "DBX_DATA_ROOT"


def resolve_root(root: str | None) -> str:
    """The data root as an absolute path: ``root``, else ``$DBX_DATA_ROOT``, else ``~/data``.

    ``~`` and ``$VARS`` are expanded. The folder need not exist: each dataset says what it
    expected to find there when it is missing.
    """
    chosen = root if root not in (None, "") else os.environ.get(DATA_ROOT_ENV) or "~/data"
    return os.path.abspath(os.path.expanduser(os.path.expandvars(str(chosen))))


def split_size(split: object) -> int:
    """Number of samples of a split: a pair ``(inputs, targets)`` of tensors or a Dataset."""
    if isinstance(split, (tuple, list)) and len(split) == 2:
        return int(split[0].shape[0])
    return len(split)  # type: ignore[arg-type]


def take_subset(splits: "DataSplits", n: int, seed: int) -> "DataSplits":
    """The same splits with the training split cut to a fixed, seeded subset of ``n`` samples.

    The subset depends only on ``n``, ``seed`` and the training split, so runs with the same seed
    train on the same samples. Indices are kept in their original order. The test split is
    unchanged (accuracy stays comparable with full runs). Tensor pairs stay tensor pairs (and keep
    the fast device-resident path); a Dataset becomes a ``torch.utils.data.Subset``.
    """
    import torch

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"data.subset must be a positive integer, got {n!r}")
    size = split_size(splits.train)
    if n > size:
        raise UserError(
            f"data.subset is {n} but the training split has only {size} samples; "
            f"set data.subset to at most {size}, or to null for the whole split"
        )
    if n == size:
        return splits
    generator = torch.Generator().manual_seed(int(seed))
    index = torch.randperm(size, generator=generator)[:n].sort().values
    if isinstance(splits.train, (tuple, list)):
        x, y = splits.train
        train = (x[index.to(x.device)], y[index.to(y.device)])
    else:
        train = torch.utils.data.Subset(splits.train, index.tolist())
    description = f"{splits.description} (training subset of {n} of {size})".strip()
    return dataclasses.replace(splits, train=train, description=description)

"""Batches of one split at a batch size that can change between epochs.

``make_loader`` returns one of two loaders with the same interface (``BatchLoader``):

- ``TensorLoader`` for a split given as a pair ``(inputs, targets)`` of tensors. Both tensors are
  moved to the training device once; each epoch draws a permutation from a seeded CPU generator
  and yields batches by index on the device, gathered a block of batches at a time (about 1 MiB
  of inputs on the CPU, 32 MiB on a GPU; views of it are the batches). No DataLoader, no worker processes, no host-device
  copies per step: a large batch costs one gather, a small one a share of one.
- ``DatasetLoader`` for a ``torch.utils.data.Dataset`` (image folders and other data too large to
  hold on the device): a ``torch.utils.data.DataLoader`` with workers and pinned memory, created
  anew at each epoch at the current batch size, its batches moved to the device without blocking.

The batch size set with ``set_batch_size`` takes effect at the next ``iter()``; an epoch in progress
keeps the size it started with. The last batch of an epoch may be smaller (nothing is dropped), so
every sample is seen exactly once per epoch.

Several processes (torchrun, ``dbx.distributed``): with ``rank`` and ``world_size``, every rank
draws the same global permutation as a single process with the same seed, cuts it into the same
global batches of ``batch_size``, and yields only its own slice of each (``shard``: sizes differ
by at most one, the first ranks take the remainder). So runs with 1 and N processes visit the same
samples in the same optimizer steps, and ``len()`` (steps per epoch) is the same on every rank.
Augmentation draws from a stream of its own per rank, so its random transforms depend on N.

Reproducibility: the order of epoch k depends only on ``seed`` and k. ``state_dict()`` (taken
between epochs, as a checkpoint is) holds the generators' states and the batch size;
``load_state_dict`` on a fresh loader makes it continue with exactly the epochs the original would
have produced.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator

import torch

__all__ = ["BatchLoader", "TensorLoader", "DatasetLoader", "make_loader", "default_num_workers", "global_batch",
           "shard"]

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

# The augmentation draws from its own stream, so that turning it on or off does not change the
# order in which samples are visited.
_AUGMENT_STREAM = 0x5EED_A06

# A shuffled epoch gathers this many bytes of inputs at a time (at least one batch), so that small
# batches share one gather. On the CPU the block stays small enough to be in cache when its batches
# are used (a larger one would be read back from memory, which a memory-bound model such as
# logistic regression notices); on a GPU only the number of launches matters.
BLOCK_BYTES = {"cpu": 2**20, "cuda": 32 * 2**20}


class BatchLoader:
    """What the training loop uses: iterate for one epoch of ``(inputs, targets)`` on the device."""

    def __init__(self, *, num_samples: int, batch_size: int, shuffle: bool, device: torch.device | str,
                 seed: int, augment: Augment | None, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.device = torch.device(device)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self._num_samples = int(num_samples)
        self._batch_size = _check_batch_size(batch_size)
        self.augment = augment
        self.generator = torch.Generator().manual_seed(self.seed)
        self.augment_generator: torch.Generator | None = None
        if augment is not None:
            self.augment_generator = torch.Generator(device=self.device)
            self.augment_generator.manual_seed((self.seed * 1_000_003 + _AUGMENT_STREAM + self.rank) % 2**63)

    @property
    def batch_size(self) -> int:
        """The batch size of the next epoch (and of the current one, unless it was just changed)."""
        return self._batch_size

    def set_batch_size(self, batch_size: int) -> None:
        """Change the batch size; it takes effect from the next ``iter()``."""
        self._batch_size = _check_batch_size(batch_size)

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def __len__(self) -> int:
        """Steps per epoch at the current batch size (the last batch may be partial)."""
        return math.ceil(self._num_samples / self._batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def global_batch(self, step: int) -> int:
        """The size of step ``step``'s global batch (all ranks' slices together) this epoch."""
        return global_batch(self._num_samples, self._batch_size, step)

    def _mine(self, batch: Any) -> Any:
        """This rank's slice of one global batch (the batch itself in a run of one)."""
        if self.world_size == 1:
            return batch
        start, stop = shard(len(batch), self.rank, self.world_size)
        return batch[start:stop]

    def _augmented(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.augment is None:
            return inputs
        return self.augment(inputs, self.augment_generator)

    def state_dict(self) -> dict[str, Any]:
        """Generator states and batch size: enough for a resumed run to see the same data order."""
        return {
            "batch_size": self._batch_size,
            "generator": self.generator.get_state(),
            "augment_generator": None if self.augment_generator is None else self.augment_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._batch_size = _check_batch_size(state["batch_size"])
        self.generator.set_state(state["generator"])
        if self.augment_generator is not None and state.get("augment_generator") is not None:
            self.augment_generator.set_state(state["augment_generator"])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_samples={self._num_samples}, batch_size={self._batch_size}, "
                f"shuffle={self.shuffle}, device={self.device}, augment={self.augment is not None})")


class TensorLoader(BatchLoader):
    """Device-resident tensors batched by index. See the module docstring."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, **kwargs: Any) -> None:
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs and targets differ in length: {inputs.shape[0]} vs {targets.shape[0]}")
        super().__init__(num_samples=inputs.shape[0], **kwargs)
        self.inputs = inputs.to(self.device)
        self.targets = targets.to(self.device)
        self._row_bytes = self.inputs[:1].nelement() * self.inputs.element_size()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The batch size and the order are fixed here, at iter(), not at the first next().
        n, size = self._num_samples, self._batch_size
        if not self.shuffle:
            return self._batches(None, size)
        order = torch.randperm(n, generator=self.generator).to(self.device, non_blocking=True)
        return self._batches(order, size)

    def _batches(self, order: torch.Tensor | None, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if order is None:
            for start in range(0, self._num_samples, size):  # contiguous slices: views, no copy
                first, last = shard(min(size, self._num_samples - start), self.rank, self.world_size)
                rows = slice(start + first, start + last)
                yield self._augmented(self.inputs[rows]), self.targets[rows]
            return
        # Gather a block of whole batches at once (about BLOCK_BYTES of inputs) and hand out views
        # of it: one gather per block instead of two per step, which small batches notice. Under
        # torchrun the block's global batches are cut to this rank's slices before the gather.
        block_bytes = BLOCK_BYTES.get(self.device.type, BLOCK_BYTES["cpu"])
        rows = max(size, block_bytes // max(1, self._row_bytes) // size * size)
        for block in order.split(rows):
            sizes: int | list[int] = size
            if self.world_size > 1:
                mine = [self._mine(batch) for batch in block.split(size)]
                block, sizes = torch.cat(mine), [len(index) for index in mine]
            inputs, targets = self.inputs[block], self.targets[block]
            for x, y in zip(inputs.split(sizes), targets.split(sizes)):
                yield self._augmented(x), y


class DatasetLoader(BatchLoader):
    """A torch DataLoader re-created each epoch at the current batch size. See the module docstring.

    Shuffling draws from this loader's seeded generator, and so do the DataLoader's worker seeds,
    so per-image random transforms in workers are reproducible too. With ``num_workers=0`` those
    transforms run in this process and use its global RNG (which dbx seeds with the run seed).
    """

    def __init__(self, dataset: Any, *, num_workers: int = 0, **kwargs: Any) -> None:
        if isinstance(num_workers, bool) or int(num_workers) != num_workers or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        super().__init__(num_samples=len(dataset), **kwargs)
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.pin_memory = self.device.type == "cuda"

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", num_workers={self.num_workers}, pin_memory={self.pin_memory})"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=_ShardedBatches(self),
            generator=self.generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )
        return self._batches(iter(loader))  # draws the order (and starts workers) now

    def _batches(self, loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for inputs, targets in loader:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            yield self._augmented(inputs), targets


class _ShardedBatches:
    """The DataLoader's batch sampler: this rank's indices of each global batch. The permutation is
    drawn lazily, at the first batch, from the loader's generator, as DataLoader's own RandomSampler
    draws it, so the order is the same as with ``shuffle=True`` in one process."""

    def __init__(self, loader: DatasetLoader) -> None:
        self.loader, self.size = loader, loader.batch_size

    def __len__(self) -> int:
        return math.ceil(self.loader.num_samples / self.size)

    def __iter__(self) -> Iterator[list[int]]:
        n = self.loader.num_samples
        order = torch.randperm(n, generator=self.loader.generator) if self.loader.shuffle else torch.arange(n)
        for batch in order.split(self.size):
            yield self.loader._mine(batch).tolist()


def global_batch(num_samples: int, batch_size: int, step: int) -> int:
    """Samples in step ``step`` (0-based) of an epoch over ``num_samples`` at ``batch_size``: all
    but the last step are full."""
    return min(batch_size, num_samples - step * batch_size)


def shard(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s slice of a batch of ``size``: ``size // world_size``
    each, and one more for each of the first ``size % world_size`` ranks."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def make_loader(
    split: Any,
    *,
    batch_size: int,
    shuffle: bool,
    device: torch.device | str,
    seed: int,
    augment: Augment | None = None,
    num_workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> BatchLoader:
    """A loader over ``split``: a pair ``(inputs, targets)`` of tensors, or a torch Dataset.

    ``augment(inputs, generator)`` (typically ``DataSplits.augment``, for the training split only)
    is applied to every batch on the device with a generator derived from ``seed``.
    ``num_workers`` only concerns Datasets: None picks ``default_num_workers(device)``.
    ``rank`` of ``world_size`` processes gets its slice of each batch (see the module docstring).
    """
    common = dict(batch_size=batch_size, shuffle=shuffle, device=device, seed=seed, augment=augment,
                  rank=rank, world_size=world_size)
    if isinstance(split, (tuple, list)):
        if len(split) != 2 or not all(isinstance(t, torch.Tensor) for t in split):
            raise TypeError("a tensor split must be a pair (inputs, targets) of tensors")
        return TensorLoader(split[0], split[1], **common)
    if isinstance(split, torch.utils.data.Dataset):
        workers = default_num_workers(device) if num_workers is None else num_workers
        return DatasetLoader(split, num_workers=workers, **common)
    raise TypeError(f"cannot batch a split of type {type(split).__name__}: expected (inputs, targets) or a Dataset")


def default_num_workers(device: torch.device | str) -> int:
    """DataLoader workers when none are asked for: on a GPU, half the CPUs this process may use
    (at most 8), so that decoding and per-image transforms keep up with the device; on the CPU,
    none (workers would compete with the training threads for the same cores)."""
    if torch.device(device).type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // 2))


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    return int(batch_size)

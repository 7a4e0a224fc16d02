"""How fast each batch size trains on this machine: the table policies read as ``EpochState.throughput``.

The loop already times every epoch's training steps (and waits for the device once at the end
of it). Per batch size, this module keeps the samples those steps trained, the seconds they took,
the number of epochs and the fastest epoch's rate. ``samples_per_second(table)`` reports, per
batch size, that fastest epoch: other processes on the machine only ever slow an epoch down (and
the first epoch at a size also pays for warm-up), so the fastest epoch is the closest to what the
machine can do at that size, the way ``timeit`` reports the best of its repeats. On a shared,
loaded machine a mean would let one slow epoch make a batch size look worse than it is.

The time the estimator reports for itself (its hooks in a measuring epoch, its extra passes) is
left out: a measuring epoch counts what its steps would have cost without the estimator, as far
as the estimator can tell, so epochs that measure and epochs that do not are comparable. No timer
and no device sync is added to the training step.

The table is plain data (``{batch_size: [samples, seconds, epochs, best samples/s]}``) kept in the
loop's ``RunState``, so it is saved in every checkpoint and a resumed run continues with it.
"""
from __future__ import annotations

from typing import Any

Table = dict[int, list[float]]  # batch size -> [samples, seconds, epochs, best samples/s]


def record(table: Table, batch_size: int, samples: int, seconds: float, diversity: Any = None) -> None:
    """Add one epoch trained at ``batch_size``: ``samples`` trained in ``seconds`` of training
    steps, less the seconds the estimator's ``diversity`` estimate says it spent (if any)."""
    if diversity is not None:
        seconds -= diversity.seconds
    if samples <= 0 or not seconds > 0:  # nothing trained, or a clock that cannot be right
        return
    entry = table.setdefault(int(batch_size), [0.0, 0.0, 0.0, 0.0])
    entry[0] += samples
    entry[1] += seconds
    entry[2] += 1
    entry[3] = max(entry[3], samples / seconds)


def samples_per_second(table: Table) -> dict[int, float]:
    """``{batch_size: samples per second of its fastest epoch}``, smallest size first."""
    return {int(batch): entry[3] for batch, entry in sorted(table.items(), key=_size)}


def as_records(table: Table) -> list[dict[str, float]]:
    """One row per batch size (for the run's ``throughput.json`` artifact)."""
    return [{"batch_size": int(batch), "epochs": int(epochs), "samples": int(samples), "seconds": seconds,
             "mean_samples_per_second": samples / seconds, "best_samples_per_second": best,
             "mean_seconds_per_step": int(batch) * seconds / samples}
            for batch, (samples, seconds, epochs, best) in sorted(table.items(), key=_size)]


def _size(item: tuple[Any, list[float]]) -> int:
    return int(item[0])  # keys are ints; a checkpoint format that stores them as text still sorts by size

"""What ``dbx.DiversityMeter`` costs in a plain training loop, side by side with the same loop without it.

Copies of one model (same initial weights, same batch) take SGD steps in one process:

- ``plain``: ``loss.backward(); optimizer.step(); optimizer.zero_grad()``, no meter;
- ``plain again``: a second plain copy: its ratio to ``plain`` is the noise floor of the machine;
- ``idle``: the same loop with ``meter.step()`` after the backward, inside ``meter.epoch(measure=False)``:
  an epoch a policy does not measure (no hook attached; ``step()`` returns at once);
- ``measuring``: the same inside a measured epoch (hooks attached, ``step()`` adds to the sums);
- ``exact``: dbx's ``exact`` estimator driven as ``dbx run``'s loop drives it, for reference.

Each round steps every copy once, in an order that rotates from round to round, and each ratio is
the median over rounds of (copy's step / plain's step in the same round), so the shared machine's
changing load hits every copy alike; the quartiles of those ratios show the noise. The ratio of
the fastest steps (each copy's least disturbed one, as ``timeit`` reports) is printed beside it. CPU seconds of this process per step, one torch thread by
default (``--threads 0``: torch's default). The ResNet-18 is the CIFAR one of
``benchmarks/estimators.py`` (3x3 stem, no max-pool, BatchNorm), as is the batch.

    python benchmarks/meter.py                          # ResNet-18, B = 128 (~4 min on a quiet CPU core)
    python benchmarks/meter.py --models mlp --batch 32 --rounds 31
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

from estimators import build_model, keep_freed_memory, make_batch

KINDS = ("plain", "plain again", "idle", "measuring", "exact")


class Loop:
    """One model and its optimizer, stepping a fixed batch; ``kind`` says what measures it."""

    def __init__(self, kind: str, model_name: str, x, y):
        import torch

        import dbx

        self.kind, self.x, self.y = kind, x, y
        self.model = build_model(model_name)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.meter = dbx.DiversityMeter(self.model) if kind in ("idle", "measuring") else None
        self.context = contextlib.ExitStack()
        self.estimator = None
        if kind == "idle":
            self.context.enter_context(self.meter.epoch(measure=False))
        elif kind == "measuring":
            self.meter.start()
        elif kind == "exact":
            from dbx.estimators import ExactEstimator

            self.estimator = ExactEstimator()
            self.estimator.attach(self.model)

    def step(self) -> None:
        import torch.nn.functional as F

        F.cross_entropy(self.model(self.x), self.y).backward()
        if self.meter is not None:
            self.meter.step()
        elif self.estimator is not None:
            scale = 1.0 / len(self.x)
            self.estimator.on_backward(scale)
            self.estimator.on_step(scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed(self) -> float:
        start = time.process_time()
        self.step()
        return time.process_time() - start


def rounds_of(loops: list[Loop], rounds: int, warmup: int) -> list[dict[str, float]]:
    """Each round steps every loop once, starting at a different one each round."""
    out = []
    for r in range(-warmup, rounds):
        shift = r % len(loops)
        times = {loop.kind: loop.timed() for loop in loops[shift:] + loops[:shift]}
        if r >= 0:
            out.append(times)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18", help="comma-separated: resnet18, mlp")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10,
                        help="timed rounds (a multiple of 5: each copy then takes each position equally often)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 = torch's default")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory (as jemalloc/tcmalloc do): no page-fault time in any step")
    args = parser.parse_args(argv)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    print(f"# dbx.DiversityMeter overhead: torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s), "
          f"CPU s per step; {args.rounds} rounds after {args.warmup} warm-up, each copy once per round in "
          f"rotating order; 'x plain' is the median over rounds of step / plain step"
          + (", glibc keeping freed memory" if args.keep_freed_memory else ""))
    print(f"{'model':<9} {'B':>4} {'loop':<12} {'step s':>8} {'x plain':>8}  {'quartiles of x plain':>20}"
          f"  {'fastest step s':>14} {'x plain':>8}")
    for model_name in [m for m in args.models.split(",") if m]:
        x, y = make_batch(args.batch, "cpu")
        loops = [Loop(kind, model_name, x, y) for kind in KINDS]
        rows = rounds_of(loops, args.rounds, args.warmup)
        fastest = {kind: min(row[kind] for row in rows) for kind in KINDS}  # the least disturbed step of each
        for kind in KINDS:
            ratios = [row[kind] / row["plain"] for row in rows]
            q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
            print(f"{model_name:<9} {args.batch:>4} {kind:<12} {statistics.median(row[kind] for row in rows):8.3f} "
                  f"{statistics.median(ratios):7.3f}x  {q1:9.3f}x-{q3:.3f}x  {fastest[kind]:14.3f} "
                  f"{fastest[kind] / fastest['plain']:7.3f}x")
        meter, exact = loops[KINDS.index("measuring")].meter, loops[KINDS.index("exact")].estimator
        meter.stop()  # the sums were real: both report over every step they measured
        reference = exact.estimate(None, None, None)
        print(f"{'':<9} {'':>4} diversity over {meter.samples} samples: meter {meter.diversity:.6g}, "
              f"exact {reference.value:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

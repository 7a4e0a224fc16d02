"""How fast one training step runs at each batch size on this machine, and what goodput makes of it.

    python benchmarks/throughput_by_batch.py                    # small CNN on MNIST-shaped data, and logreg
    python benchmarks/throughput_by_batch.py --model logreg --sizes 32,128,512,1024 --repeats 7

For each model, the batch sizes are timed in turns (size after size, ``--repeats`` rounds, so a
burst of load on a shared machine hits every size alike) and each size's best round is kept, as
the training loop's throughput table keeps each size's fastest epoch. The printout is the
samples per second at each size, its ratio to the smallest size, and the step-time fit
T(B) = a + b B that ``dbx.policies.goodput`` would make of the table, with a / b (the batch size at
which a step's fixed cost equals its per-sample cost) and the batch size goodput would choose,
sqrt(B_simple a / b), for a few noise scales. Where the ratio stays near 1 the throughput has
saturated and goodput keeps B small; where it grows with B, goodput grows B.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from dbx.models.cnn import small_cnn
from dbx.models.linear import logreg
from dbx.policies.goodput import fit_step_time

MODELS = {
    "small_cnn": (lambda: small_cnn(num_classes=10, input_shape=(1, 28, 28), channels=[8, 16], hidden=32),
                  (1, 28, 28), 10),
    "logreg": (lambda: logreg(num_classes=2, input_shape=(256,)), (256,), 2),
}


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: int, shape: tuple[int, ...],
                 classes: int, samples: int) -> float:
    """Seconds per optimizer step at ``batch``, over about ``samples`` samples."""
    x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))
    steps = max(3, samples // batch)
    start = time.perf_counter()
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(x), y, reduction="sum").div(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--sizes", default="32,64,128,256,512,1024", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="rounds over all sizes; each size keeps its best")
    parser.add_argument("--samples", type=int, default=4096, help="samples per size per round")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for name in (MODELS if args.model == "all" else [args.model]):
        build, shape, classes = MODELS[name]
        torch.manual_seed(0)
        model = build()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step_seconds(model, optimizer, sizes[0], shape, classes, args.samples)  # warm-up
        best = {b: math.inf for b in sizes}
        for _ in range(args.repeats):
            for b in sizes:
                best[b] = min(best[b], step_seconds(model, optimizer, b, shape, classes, args.samples))
        table = {b: b / best[b] for b in sizes}
        print(f"\n{name}: samples/s per batch size (best of {args.repeats} rounds)")
        for b in sizes:
            print(f"  B {b:>5}  {table[b]:>10.0f} samples/s  {table[b] / table[sizes[0]]:5.2f}x B={sizes[0]}   "
                  f"step {best[b] * 1e3:8.3f} ms")
        fixed, per_sample = fit_step_time(table)
        ratio = fixed / per_sample if per_sample > 0 else math.inf
        print(f"  fit T(B) = {fixed * 1e3:.3f} ms + {per_sample * 1e6:.3f} us x B;  a / b = {ratio:.0f} samples")
        for noise in (100, 1000, 10000):
            choice = f"{math.sqrt(noise * ratio):.0f}" if math.isfinite(ratio) else "as large as allowed (max)"
            print(f"  noise scale {noise:>6}: goodput's B* = sqrt(B_simple a / b) = {choice}")


if __name__ == "__main__":
    main()

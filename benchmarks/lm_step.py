"""What a language model's measuring step costs, and what gradient clipping costs, with dbx's own loop.

The model and data of ``experiments/lm/cpu`` (a 2-block GPT of width 64 on byte-level Python, AdamW,
sequences of 64 bytes) at the batch sizes the comparison uses. Three variants of the same training
step, each through ``dbx.train.loop.train_one_epoch`` over the same batches with the same weights:

- ``plain``: forward, backward, AdamW step;
- ``clip``: the same with ``clip_grad_norm`` (one ``clip_grad_norm_`` over every parameter);
- ``exact``: the same with the ``exact`` estimator attached (the measuring epochs of DiveBatch).

Measured side by side: the variants take an "epoch" of ``--steps`` steps in turn, the order rotated
every round, and each ratio is the median over rounds of variant / plain. On CPU the time is the
process's CPU seconds (one thread by default: ``--threads``), so other jobs on a shared machine
count for neither side; ``--wall`` reports wall-clock time instead.

    python benchmarks/lm_step.py                          # B = 16 and 256, about a minute on 2 CPU cores
    python benchmarks/lm_step.py --batch-sizes 32 --rounds 9 --device cuda --wall
"""
from __future__ import annotations

import argparse
import statistics
import time

VARIANTS = ("plain", "clip", "exact")


def build(batch_size: int, steps: int, device: str):
    import torch

    from dbx.data.loader import make_loader
    from dbx.data.text import python_stdlib
    from dbx.estimators import ExactEstimator
    from dbx.models.transformer import transformer_lm
    from dbx.spec import LossSpec
    from dbx.train.parts import Parts
    from dbx.train.tasks import build_task

    data = python_stdlib(seq_len=64, max_bytes=65 * batch_size * steps + 20_000)
    x, y = data.train
    split = (x[: batch_size * steps], y[: batch_size * steps])
    torch.manual_seed(0)
    model = transformer_lm(num_classes=256, input_shape=(64,), width=64, depth=2, heads=2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    loader = make_loader(split, batch_size=batch_size, shuffle=True, device=device, seed=0)
    parts = Parts(data, model, optimizer, None, None, loader, None, build_task(LossSpec(), data), torch.device(device))
    return parts, ExactEstimator()


def one_epoch(parts, estimator, variant: str, wall: bool) -> float:
    import torch

    from dbx.train.loop import train_one_epoch

    clock = time.perf_counter if wall else time.process_time
    start = clock()
    if variant == "exact":
        estimator.attach(parts.model)
    trained = train_one_epoch(parts, None, estimator if variant == "exact" else None, lambda: None,
                              clip=1.0 if variant == "clip" else None)
    if variant == "exact":
        estimator.estimate(parts.model, parts.loss_fn, None)
        estimator.detach()
    if parts.device.type == "cuda":
        torch.cuda.synchronize()
    assert trained.steps > 0
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="16,256")
    parser.add_argument("--steps", type=int, default=8, help="steps per measured epoch")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--wall", action="store_true", help="wall-clock time instead of CPU time")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = "wall" if args.wall or args.device != "cpu" else "CPU"
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} thread(s), {clock} seconds; "
          f"{args.steps} steps per epoch, median of {args.rounds} rounds")
    print("| batch | plain ms/step | clip x plain | exact x plain |")
    print("|--:|--:|--:|--:|")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        runners = {v: build(batch_size, args.steps, args.device) for v in VARIANTS}
        for variant, (parts, estimator) in runners.items():  # warm-up: allocations, first hooks
            one_epoch(parts, estimator, variant, args.wall or args.device != "cpu")
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for round_ in range(args.rounds):
            order = VARIANTS[round_ % 3:] + VARIANTS[:round_ % 3]
            for variant in order:
                parts, estimator = runners[variant]
                times[variant].append(one_epoch(parts, estimator, variant, args.wall or args.device != "cpu"))
        ratio = {v: statistics.median(t / p for t, p in zip(times[v], times["plain"], strict=True)) for v in VARIANTS}
        plain_ms = statistics.median(times["plain"]) / args.steps * 1e3
        print(f"| {batch_size} | {plain_ms:.1f} | {ratio['clip']:.2f}x | {ratio['exact']:.2f}x |")


if __name__ == "__main__":
    main()

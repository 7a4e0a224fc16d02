"""``compile: true``: a batch dimension marked dynamic against one compilation per batch size.

    OMP_NUM_THREADS=1 python benchmarks/compile.py
    python benchmarks/compile.py --models mlp --batch-sizes 32,64,128,256 --device cuda

For each model, three copies from the same weights train through the same sequence of batch
sizes (as a batch-size policy would visit them, each followed by a short last batch): eager,
``dynamic`` (``dbx.train.compile``'s choice: one compilation for all sizes) and ``buckets``
(``torch.compile(dynamic=False)``: one compilation per distinct size). Printed per mode: the
seconds spent in the first step of each new size (compilation included), and the steady-state
samples/s of a training step (forward, backward, SGD) at each size, measured in turns with the
other modes so that load on a shared machine hits all alike.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F

from dbx.train.compile import compile_for_training


def build_model(name: str) -> torch.nn.Module:
    from dbx.models.cnn import small_cnn
    from dbx.models.linear import logreg
    from dbx.models.mlp import mlp

    torch.manual_seed(0)
    factory = {"logreg": logreg, "mlp": mlp, "small_cnn": small_cnn}[name]
    return factory(num_classes=10, input_shape=(1, 28, 28))


def step(forward, optimizer, x, y) -> None:
    loss = F.cross_entropy(forward(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="logreg,mlp,small_cnn")
    parser.add_argument("--batch-sizes", default="32,64,128,256")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per size and mode")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    visits = [s for b in sizes for s in (b, max(1, b * 3 // 4))]  # each size, then a short last batch
    print(f"device {device}, {torch.get_num_threads()} thread(s); sizes visited: {visits}")
    for name in args.models.split(","):
        torch._dynamo.reset()
        base = build_model(name).to(device)
        modes = {}
        for mode in ("eager", "dynamic", "buckets"):
            model = copy.deepcopy(base)
            forward = model if mode == "eager" else compile_for_training(model, mode)
            modes[mode] = (forward, torch.optim.SGD(model.parameters(), lr=0.01))
        first = {mode: [] for mode in modes}
        for size in visits:
            x = torch.randn(size, 1, 28, 28, device=device)
            y = torch.randint(0, 10, (size,), device=device)
            for mode, (forward, optimizer) in modes.items():
                synchronize(device)
                start = time.perf_counter()
                step(forward, optimizer, x, y)
                synchronize(device)
                first[mode].append(time.perf_counter() - start)
        rates = {mode: {} for mode in modes}
        for size in sizes:
            x = torch.randn(size, 1, 28, 28, device=device)
            y = torch.randint(0, 10, (size,), device=device)
            best = dict.fromkeys(modes, float("inf"))
            for _ in range(3):
                for mode, (forward, optimizer) in modes.items():
                    synchronize(device)
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step(forward, optimizer, x, y)
                    synchronize(device)
                    best[mode] = min(best[mode], (time.perf_counter() - start) / args.steps)
            for mode in modes:
                rates[mode][size] = size / best[mode]
        print(f"\n{name}")
        print(f"  {'mode':8} {'first steps (s)':>16} " + " ".join(f"{'B=' + str(s):>9}" for s in sizes)
              + "   (samples/s; x eager)")
        for mode in modes:
            cells = " ".join(f"{rates[mode][s]:>9.0f}" for s in sizes)
            ratio = " ".join(f"{rates[mode][s] / rates['eager'][s]:.2f}" for s in sizes)
            print(f"  {mode:8} {sum(first[mode]):>16.2f} {cells}   {ratio}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

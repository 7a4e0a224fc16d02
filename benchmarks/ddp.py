"""Samples per second of dbx's training step on 1 and 2 processes (torchrun, DDP), side by side.

    OMP_NUM_THREADS=1 python benchmarks/ddp.py                 # CPU, gloo: 1 and 2 processes
    python benchmarks/ddp.py --device cuda --nprocs 1,2        # nccl, one GPU per process

For each number of processes the script starts a torchrun job of itself (``--worker``) that builds
the parts of a synthetic spec with ``dbx.train.parts.build_parts`` (so the model is in DDP with
dbx's summing gradient hook, and each rank loads its slice of every global batch) and times
``dbx.train.loop.train_one_epoch`` at one global batch size: plain epochs, and measuring epochs
with the ``exact`` estimator attached. It also times the estimator's own communication: the one
all-reduce of the per-layer sums of squared norms that ``estimate`` adds per measuring epoch
(DDP's gradient all-reduce is paid by every step, measuring or not, and is in both columns).

A speedup from 2 processes needs 2 free cores (or 2 GPUs): on a machine whose cores are busy the
second process only adds communication. Ratios are of runs made one after the other in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spec_for(args: argparse.Namespace):
    from dbx.spec import spec_from_dict

    return spec_from_dict({
        "name": "ddp-benchmark", "seed": 0, "device": args.device, "epochs": 1,
        "data": {"name": "synthetic_logistic", "params": {"n": args.samples, "d": args.features}},
        "model": {"name": "mlp", "params": {"widths": [args.width, args.width]}},
        "optimizer": {"lr": 0.01, "momentum": 0.9},
        "max_micro_batch": args.micro_batch,
        "policy": {"name": "fixed", "params": {"batch_size": args.batch_size}},
        "tracking": {"system_metrics": False},
    })


def worker(args: argparse.Namespace) -> None:
    """One rank of the job: time epochs; rank 0 writes the numbers to ``args.out``."""
    import torch

    from dbx import distributed, registry
    from dbx.estimators.exact import _summed_over_ranks
    from dbx.runner import _device
    from dbx.train.loop import train_one_epoch
    from dbx.train.parts import build_parts

    distributed.setup()
    spec = spec_for(args)
    device, _ = _device(spec)
    parts = build_parts(spec, device)
    estimator = registry.build("estimator", "exact", {}, seed=0)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        distributed.sum_across_ranks(torch.zeros(1))  # every rank has finished

    def epoch_seconds(measuring: bool) -> float:
        if measuring:
            estimator.attach(parts.model)
        synchronize()
        start = time.perf_counter()
        train_one_epoch(parts, spec.max_micro_batch, estimator if measuring else None, lambda: None)
        if measuring:
            estimator.estimate(parts.model, parts.loss_fn, parts.data.train)
            estimator.detach()
        synchronize()
        return time.perf_counter() - start

    epoch_seconds(False)  # warm-up: allocations, DDP's first buckets, the hooks' first trace
    epoch_seconds(True)
    plain = min(epoch_seconds(False) for _ in range(args.epochs))
    measuring = min(epoch_seconds(True) for _ in range(args.epochs))

    estimator.attach(parts.model)
    sums = torch.zeros(len(estimator._hooks.layers), dtype=torch.float64, device=device)
    samples = torch.zeros((), dtype=torch.long, device=device)
    estimator.detach()
    for _ in range(10):
        _summed_over_ranks(sums.clone(), samples)
    synchronize()
    start = time.perf_counter()
    for _ in range(args.reduce_reps):
        _summed_over_ranks(sums.clone(), samples)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reduce_seconds = (time.perf_counter() - start) / args.reduce_reps
    if distributed.rank() == 0:
        steps = len(parts.train_loader)
        with open(args.out, "w") as handle:
            json.dump({"processes": distributed.world_size(), "backend": _backend(), "steps": steps,
                       "samples": parts.train_loader.num_samples, "plain_seconds": plain,
                       "measuring_seconds": measuring, "reduce_seconds": reduce_seconds,
                       "layers": int(sums.numel())}, handle)


def _backend() -> str:
    from dbx.distributed.group import backend

    return backend() or "none (one process)"


def launch(args: argparse.Namespace, nproc: int, out: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               os.path.abspath(__file__), "--worker", "--out", out, *sys.argv[1:]]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL if not args.verbose else None)
    with open(out) as handle:
        return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    parser.add_argument("--nprocs", default="1,2", help="comma-separated numbers of processes")
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=512, help="the global batch")
    parser.add_argument("--micro-batch", type=int, default=None, help="max_micro_batch (per rank)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs of each kind (the best is kept)")
    parser.add_argument("--reduce-reps", type=int, default=200)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    nprocs = [int(n) for n in args.nprocs.split(",")]
    if args.device.startswith("cuda"):
        import torch

        available = torch.cuda.device_count()
        skipped = [n for n in nprocs if n > available]
        if skipped:
            print(f"skipping {skipped} processes: this machine has {available} GPU(s), nccl needs one per process")
        nprocs = [n for n in nprocs if n <= available]
    print(f"threads per process: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"cpus: {os.cpu_count()}; device {args.device}; global batch {args.batch_size}; "
          f"mlp {args.features}-{args.width}-{args.width}-2 on {args.samples} samples")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for nproc in nprocs:
            results.append(launch(args, nproc, os.path.join(folder, f"{nproc}.json")))
    base = results[0]
    print(f"{'procs':>5} {'backend':>20} {'steps':>5} {'plain samples/s':>16} {'measuring samples/s':>20} "
          f"{'vs ' + str(base['processes']) + ' proc':>10} {'estimator all-reduce':>22} {'per step':>10}")
    for r in results:
        plain, measuring = r["samples"] / r["plain_seconds"], r["samples"] / r["measuring_seconds"]
        ratio = plain / (base["samples"] / base["plain_seconds"])
        print(f"{r['processes']:>5} {r['backend']:>20} {r['steps']:>5} {plain:>16.0f} {measuring:>20.0f} "
              f"{ratio:>9.2f}x {r['reduce_seconds'] * 1e6:>18.1f} us {r['reduce_seconds'] / r['steps'] * 1e6:>8.2f} us")
        r["plain_samples_per_second"], r["measuring_samples_per_second"] = plain, measuring
    print("estimator all-reduce: once per measuring epoch (layers + 1 numbers); 'per step' spreads it over the "
          "epoch's steps. The gradient all-reduce of DDP is inside both samples/s columns.")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

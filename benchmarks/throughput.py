"""dbx's training loop against a bare hand-written one: samples per second, side by side.

    OMP_NUM_THREADS=1 python benchmarks/throughput.py
    python benchmarks/throughput.py --device cuda --models resnet18_cifar --batch-sizes 128 --cuda-graphs
    DBX_DATA_ROOT=/path/to/data python benchmarks/throughput.py --models small_cnn --batch-sizes 32,128

For each model (logistic regression, the MLP, the small CNN) and batch size, three epochs over the
same device-resident tensors, from the same weights, with the same SGD:

- ``bare``: the loop a user would write (a permutation, index, forward, mean cross-entropy,
  backward, step, zero_grad, and a running loss kept on the device and read once an epoch);
- ``dbx``: ``dbx.train.loop.fit`` for one epoch with the fixed policy and an MLflow run open
  (metrics logged after the epoch, as ``dbx run`` does), timed by its own ``epoch_seconds``;
- ``measuring``: the same with the exact estimator attached (a policy that measures every
  epoch at the same batch size), its ``epoch_seconds`` including the estimate;
- ``graphs`` (with ``--cuda-graphs``, on CUDA): ``dbx`` with ``cuda_graphs: true``. Each epoch is
  a ``fit`` call of its own, so it pays one eager step and one capture per batch shape, as every
  epoch of a run with an lr schedule does (a new lr is a new graph).

dbx's epoch does more than the bare one: it also counts train accuracy. The three run in turns,
in an order that rotates every round (at least ``--rounds``, and until each has run
``--min-seconds``), so a burst of load on a shared machine hits all alike, and each keeps its
fastest round (the training loop's own throughput table keeps fastest epochs too).
Printed: samples/s of each, ``dbx/bare`` (target >= 0.95) and ``measuring/dbx`` time (target
<= 1.15), by two clocks: ``wall`` (dbx's own ``epoch_seconds``) and ``cpu``, this thread's CPU
time in the epoch's training (and the estimate), which other processes on a loaded machine
disturb far less than the wall clock (with one thread all of torch's CPU work runs in it; on
CUDA it is host time only, so read the wall clock there). Data: MNIST's training images when ``DBX_DATA_ROOT`` holds MNIST, else random tensors of
MNIST's shape and classes (the timing depends on shapes only). One CPU thread unless told.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

MODELS = ("logreg", "mlp", "small_cnn")
CLOCKS = ("wall", "cpu")
MNIST_SHAPE, CIFAR_SHAPE = (1, 28, 28), (3, 32, 32)


def load_data(samples: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, str]:
    root = os.environ.get("DBX_DATA_ROOT")
    if root and shape == MNIST_SHAPE:
        from dbx.data.mnist import mnist

        try:
            data = mnist(root=root)
            x, y = data.train
            return x[:samples].contiguous(), y[:samples].contiguous(), f"MNIST from {root}"
        except Exception as error:  # noqa: BLE001 - fall back to the same shapes, and say so
            print(f"MNIST not loaded from {root} ({error}); synthetic data instead", file=sys.stderr)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, *shape, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    return x, y, f"synthetic, shaped {shape}"


def input_shape(name: str) -> tuple[int, ...]:
    return CIFAR_SHAPE if name == "resnet18_cifar" else MNIST_SHAPE


def build_model(name: str) -> torch.nn.Module:
    from dbx.models.cnn import small_cnn
    from dbx.models.linear import logreg
    from dbx.models.mlp import mlp
    from dbx.models.resnet import resnet18_cifar

    torch.manual_seed(0)
    factory = {"logreg": logreg, "mlp": mlp, "small_cnn": small_cnn, "resnet18_cifar": resnet18_cifar}[name]
    return factory(num_classes=10, input_shape=input_shape(name))


class MeasureEveryEpoch:
    """A fixed batch size whose every epoch is measured: the measuring epoch's cost at that size."""

    uses_diversity = True

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def initial_batch_size(self) -> int:
        return self.batch_size

    def measures_in(self, epoch: int) -> bool:
        return True

    def next_batch_size(self, state, diversity) -> int:
        return self.batch_size


class MlflowTracker:
    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in metrics.items()])


CPU_SECONDS: list[float] = []  # this thread's CPU time in the epoch's training (and its estimate)


def on_cpu_clock(function):
    """``function``, adding the CPU time this thread spends in it to ``CPU_SECONDS``."""
    def timed(*args, **kwargs):
        start = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            CPU_SECONDS.append(time.thread_time() - start)
    return timed


def dbx_runner(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, measuring: bool,
               tracker: MlflowTracker, lr: float, device: torch.device, graphs: bool = False):
    """One dbx ``fit`` epoch per call; returns its ``epoch_seconds``."""
    from dbx.data.loader import make_loader
    from dbx.policies.fixed import FixedBatch
    from dbx.protocols import DataSplits
    from dbx.registry import build
    from dbx.spec import spec_from_dict
    from dbx.train.loop import RunState, fit
    from dbx.train.parts import Parts
    from dbx.train.tasks import build_task

    test = (x[:512], y[:512])
    data = DataSplits(train=(x, y), test=test, num_classes=10, input_shape=tuple(x.shape[1:]))
    policy = MeasureEveryEpoch(batch_size) if measuring else FixedBatch(batch_size=batch_size)
    estimator = build("estimator", "exact", {}, seed=0) if measuring else None
    if estimator is not None:
        estimator.estimate = on_cpu_clock(estimator.estimate)
    spec = spec_from_dict({
        "name": "throughput", "seed": 0, "device": device.type, "epochs": 1, "cuda_graphs": graphs,
        "data": {"name": "synthetic_logistic"}, "model": {"name": "logreg"}, "optimizer": {"name": "sgd", "lr": lr},
        "policy": {"name": "fixed", "params": {"batch_size": batch_size}},
        "checkpoint": {"enabled": False}, "tracking": {"system_metrics": False}})
    parts = Parts(data=data, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), policy=policy,
                  estimator=estimator,
                  train_loader=make_loader((x, y), batch_size=batch_size, shuffle=True, device=device, seed=0),
                  test_loader=make_loader(test, batch_size=512, shuffle=False, device=device, seed=0),
                  task=build_task(spec.loss, data), device=device)
    state = RunState(batch_size=batch_size)
    said: set[str] = set()

    def say(line: str) -> None:  # the run's messages (a cuda_graphs fallback), each once
        if line.startswith("cuda_graphs") and line not in said:
            said.add(line)
            print(line, file=sys.stderr)

    def epoch() -> tuple[float, float]:
        CPU_SECONDS.clear()
        fit(spec.model_copy(update={"epochs": state.epoch + 1}), parts, tracker, say=say, state=state)
        return state.history[-1]["epoch_seconds"], sum(CPU_SECONDS)

    return epoch


def bare_runner(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, lr: float,
                device: torch.device):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)

    def epoch() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.thread_time()
        model.train()
        loss_sum = torch.zeros((), device=device)
        for index in torch.randperm(len(x), generator=generator).to(device).split(batch_size):
            loss = F.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        loss_sum.item()
        return time.perf_counter() - start, time.thread_time() - cpu

    return epoch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-sizes", default="32,128,512,2048")
    parser.add_argument("--samples", type=int, default=8192, help="training samples per epoch")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds at least (after one warm-up round)")
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="more rounds until each variant has been timed this long in all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cuda-graphs", action="store_true", help="also dbx's plain epoch with cuda_graphs: true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import mlflow

    from dbx.train import loop

    loop.train_one_epoch = on_cpu_clock(loop.train_one_epoch)  # fit looks it up at each call

    folder = tempfile.mkdtemp(prefix="dbx-throughput-")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment = client.create_experiment("throughput")
    print(f"{args.samples} training samples per epoch on {device}; {torch.get_num_threads()} thread(s); best of "
          f">= {args.rounds} rounds (>= {args.min_seconds:g} s each) after a warm-up, order rotating")
    graphs = ("graphs/s", "graphs/dbx") if args.cuda_graphs else ()
    print(f"{'model':14} {'B':>5} {'clock':>5} {'bare/s':>9} {'dbx/s':>9} {'measure/s':>9} {'dbx/bare':>8} {'meas/dbx':>8}"
          + "".join(f" {g:>10}" for g in graphs) + "  data")
    worst = {clock: {"dbx/bare": float("inf"), "meas/dbx": 0.0} for clock in CLOCKS}
    for name in args.models.split(","):
        x, y, source = load_data(args.samples, input_shape(name))
        x, y = x.to(device), y.to(device)
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            start = build_model(name).to(device)
            run = client.create_run(experiment, run_name=f"{name}-{batch_size}")
            tracker = MlflowTracker(client, run.info.run_id)
            runners = {
                "bare": bare_runner(copy.deepcopy(start), x, y, batch_size, 0.01, device),
                "dbx": dbx_runner(copy.deepcopy(start), x, y, batch_size, False, tracker, 0.01, device),
                "measuring": dbx_runner(copy.deepcopy(start), x, y, batch_size, True, tracker, 0.01, device),
            }
            if args.cuda_graphs:
                runners["graphs"] = dbx_runner(copy.deepcopy(start), x, y, batch_size, False, tracker, 0.01, device,
                                               graphs=True)
            order = list(runners)
            best = {clock: dict.fromkeys(order, float("inf")) for clock in CLOCKS}
            spent = dict.fromkeys(order, 0.0)
            round_ = 0
            while round_ <= args.rounds or min(spent.values()) < args.min_seconds:
                turn = round_ % len(order)
                for key in order[turn:] + order[:turn]:
                    seconds = dict(zip(CLOCKS, runners[key]()))
                    if round_ > 0:  # round 0 warms up
                        spent[key] += seconds["wall"]
                        for clock in CLOCKS:
                            best[clock][key] = min(best[clock][key], seconds[clock])
                round_ += 1
            client.set_terminated(run.info.run_id)
            for clock in CLOCKS:
                rate = {key: len(x) / seconds for key, seconds in best[clock].items()}
                ratio, measure = rate["dbx"] / rate["bare"], best[clock]["measuring"] / best[clock]["dbx"]
                worst[clock]["dbx/bare"] = min(worst[clock]["dbx/bare"], ratio)
                worst[clock]["meas/dbx"] = max(worst[clock]["meas/dbx"], measure)
                extra = f" {rate['graphs']:>10.0f} {rate['graphs'] / rate['dbx']:>10.3f}" if args.cuda_graphs else ""
                print(f"{name:14} {batch_size:>5} {clock:>5} {rate['bare']:>9.0f} {rate['dbx']:>9.0f} "
                      f"{rate['measuring']:>9.0f} {ratio:>8.3f} {measure:>8.3f}{extra}  {source}", flush=True)
    for clock in CLOCKS:
        print(f"{clock} clock: worst dbx/bare {worst[clock]['dbx/bare']:.3f} (target >= 0.95); "
              f"worst measuring/dbx time {worst[clock]['meas/dbx']:.3f} (target <= 1.15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

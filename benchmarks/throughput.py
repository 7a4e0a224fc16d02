"""dbx's training loop against a bare hand-written one: samples per second, side by side.

    OMP_NUM_THREADS=1 python benchmarks/throughput.py
    DBX_DATA_ROOT=/path/to/data python benchmarks/throughput.py --models small_cnn --batch-sizes 32,128

For each model (logistic regression, the MLP, the small CNN) and batch size, three epochs over the
same device-resident tensors, from the same weights, with the same SGD:

- ``bare``: the loop a user would write (a permutation, index, forward, mean cross-entropy,
  backward, step, zero_grad, and a running loss kept on the device and read once an epoch);
- ``dbx``: ``dbx.train.loop.fit`` for one epoch with the fixed policy and an MLflow run open
  (metrics logged after the epoch, as ``dbx run`` does), timed by its own ``epoch_seconds``;
- ``measuring``: the same with the exact estimator attached (a policy that measures every
  epoch at the same batch size), its ``epoch_seconds`` including the estimate.

dbx's epoch does more than the bare one: it also counts train accuracy. The three run in turns,
in an order that rotates every round, so a burst of load on a shared machine hits all alike, and
each keeps its fastest round (the training loop's own throughput table keeps fastest epochs too).
Printed: samples/s of each, ``dbx/bare`` (target >= 0.95) and ``measuring/dbx`` time (target
<= 1.15). Data: MNIST's training images when ``DBX_DATA_ROOT`` holds MNIST, else random tensors of
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


def load_data(samples: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    root = os.environ.get("DBX_DATA_ROOT")
    if root:
        from dbx.data.mnist import mnist

        try:
            data = mnist(root=root)
            x, y = data.train
            return x[:samples].contiguous(), y[:samples].contiguous(), f"MNIST from {root}"
        except Exception as error:  # noqa: BLE001 - fall back to the same shapes, and say so
            print(f"MNIST not loaded from {root} ({error}); synthetic data instead", file=sys.stderr)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    return x, y, "synthetic, MNIST-shaped"


def build_model(name: str) -> torch.nn.Module:
    from dbx.models.cnn import small_cnn
    from dbx.models.linear import logreg
    from dbx.models.mlp import mlp

    torch.manual_seed(0)
    factory = {"logreg": logreg, "mlp": mlp, "small_cnn": small_cnn}[name]
    return factory(num_classes=10, input_shape=(1, 28, 28))


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


def dbx_runner(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, measuring: bool,
               tracker: MlflowTracker, lr: float):
    """One dbx ``fit`` epoch per call; returns its ``epoch_seconds``."""
    from dbx.data.loader import make_loader
    from dbx.policies.fixed import FixedBatch
    from dbx.protocols import DataSplits
    from dbx.registry import build
    from dbx.spec import spec_from_dict
    from dbx.train.loop import RunState, fit
    from dbx.train.parts import Parts
    from dbx.train.tasks import build_task

    device = torch.device("cpu")
    test = (x[:512], y[:512])
    data = DataSplits(train=(x, y), test=test, num_classes=10, input_shape=tuple(x.shape[1:]))
    policy = MeasureEveryEpoch(batch_size) if measuring else FixedBatch(batch_size=batch_size)
    estimator = build("estimator", "exact", {}, seed=0) if measuring else None
    spec = spec_from_dict({
        "name": "throughput", "seed": 0, "device": "cpu", "epochs": 1,
        "data": {"name": "synthetic_logistic"}, "model": {"name": "logreg"}, "optimizer": {"name": "sgd", "lr": lr},
        "policy": {"name": "fixed", "params": {"batch_size": batch_size}},
        "checkpoint": {"enabled": False}, "tracking": {"system_metrics": False}})
    parts = Parts(data=data, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), policy=policy,
                  estimator=estimator,
                  train_loader=make_loader((x, y), batch_size=batch_size, shuffle=True, device=device, seed=0),
                  test_loader=make_loader(test, batch_size=512, shuffle=False, device=device, seed=0),
                  task=build_task(spec.loss, data), device=device)
    state = RunState(batch_size=batch_size)

    def epoch() -> float:
        fit(spec.model_copy(update={"epochs": state.epoch + 1}), parts, tracker, say=lambda line: None, state=state)
        return state.history[-1]["epoch_seconds"]

    return epoch


def bare_runner(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, lr: float):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)

    def epoch() -> float:
        start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros(())
        for index in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        loss_sum.item()
        return time.perf_counter() - start

    return epoch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-sizes", default="32,128,512,2048")
    parser.add_argument("--samples", type=int, default=8192, help="training samples per epoch")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import mlflow

    x, y, source = load_data(args.samples)
    folder = tempfile.mkdtemp(prefix="dbx-throughput-")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment = client.create_experiment("throughput")
    print(f"data: {source}, {len(x)} training samples per epoch; {torch.get_num_threads()} thread(s); "
          f"best of {args.rounds} rounds after a warm-up, order rotating")
    print(f"{'model':10} {'B':>5} {'bare/s':>9} {'dbx/s':>9} {'measure/s':>9} {'dbx/bare':>8} {'meas/dbx':>8}")
    worst = {"dbx/bare": float("inf"), "meas/dbx": 0.0}
    for name in args.models.split(","):
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            start = build_model(name)
            run = client.create_run(experiment, run_name=f"{name}-{batch_size}")
            tracker = MlflowTracker(client, run.info.run_id)
            runners = {
                "bare": bare_runner(copy.deepcopy(start), x, y, batch_size, lr=0.01),
                "dbx": dbx_runner(copy.deepcopy(start), x, y, batch_size, False, tracker, lr=0.01),
                "measuring": dbx_runner(copy.deepcopy(start), x, y, batch_size, True, tracker, lr=0.01),
            }
            order = list(runners)
            best = dict.fromkeys(order, float("inf"))
            for round_ in range(args.rounds + 1):
                for key in order[round_ % 3:] + order[:round_ % 3]:
                    seconds = runners[key]()
                    if round_ > 0:
                        best[key] = min(best[key], seconds)
            client.set_terminated(run.info.run_id)
            rate = {key: len(x) / seconds for key, seconds in best.items()}
            ratio, measure = rate["dbx"] / rate["bare"], best["measuring"] / best["dbx"]
            worst["dbx/bare"], worst["meas/dbx"] = min(worst["dbx/bare"], ratio), max(worst["meas/dbx"], measure)
            print(f"{name:10} {batch_size:>5} {rate['bare']:>9.0f} {rate['dbx']:>9.0f} {rate['measuring']:>9.0f} "
                  f"{ratio:>8.3f} {measure:>8.3f}", flush=True)
    print(f"worst dbx/bare {worst['dbx/bare']:.3f} (target >= 0.95); worst measuring/dbx time "
          f"{worst['meas/dbx']:.3f} (target <= 1.15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

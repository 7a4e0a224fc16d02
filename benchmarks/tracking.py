"""How much MLflow logging costs a training run, measured side by side in one process.

1. One epoch's metrics (13 values) written with dbx's single ``log_batch`` against 13
   ``log_metric`` calls, on a fresh sqlite store: the ratio is why dbx buffers.
2. The quickstart's training loop with a real MLflow run attached against the same loop with a
   tracker that drops everything: the ratio is what logging adds to a whole run.

    python benchmarks/tracking.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def time_logging(repeats: int) -> tuple[float, float]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    keys = ["train_loss", "train_accuracy", "test_loss", "test_accuracy", "batch_size", "lr", "diversity",
            "epoch_seconds", "eval_seconds", "train_seconds", "wall_seconds", "samples_seen", "optimizer_steps"]
    with tempfile.TemporaryDirectory() as folder:
        client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
        run_id = client.create_run(client.create_experiment("bench")).info.run_id
        batch, single = [], []
        for step in range(repeats):
            now = int(time.time() * 1000)
            started = time.perf_counter()
            client.log_batch(run_id, metrics=[Metric(k, 1.0, now, 2 * step) for k in keys])
            batch.append(time.perf_counter() - started)
            started = time.perf_counter()
            for k in keys:
                client.log_metric(run_id, k, 1.0, step=2 * step + 1)
            single.append(time.perf_counter() - started)
    return statistics.median(batch), statistics.median(single)


def time_training(repeats: int) -> tuple[float, float]:
    import torch

    from dbx import tracking
    from dbx.spec import load_spec
    from dbx.train.loop import fit
    from dbx.train.parts import build_parts

    class Nothing:
        def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
            pass

    spec = load_spec(REPO / "experiments" / "quickstart.yaml", ["epochs=4", "tracking.system_metrics=false"])
    with_mlflow, without = [], []
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        fit(spec, build_parts(spec, torch.device("cpu")), Nothing(), say=lambda line: None)  # warm-up, untimed
        for repeat in range(repeats):  # interleaved, order alternating, so drift in load hits both alike
            for sink in (("none", "mlflow") if repeat % 2 == 0 else ("mlflow", "none")):
                parts = build_parts(spec, torch.device("cpu"))
                tracker = Nothing() if sink == "none" else tracking.open_run(
                    spec, uri=uri, experiment=None, run_name="bench", device_label="cpu", plugins={})
                started = time.perf_counter()
                fit(spec, parts, tracker, say=lambda line: None)
                (without if sink == "none" else with_mlflow).append(time.perf_counter() - started)
                if sink == "mlflow":
                    tracker.finish("FINISHED")
    return statistics.median(with_mlflow), statistics.median(without)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    batch, single = time_logging(max(args.repeats, 5))
    print(f"one epoch of metrics: log_batch {batch * 1e3:.2f} ms, 13 x log_metric {single * 1e3:.2f} ms "
          f"-> log_metric is {single / batch:.1f}x slower")
    with_mlflow, without = time_training(args.repeats)
    print(f"quickstart, 4 epochs: {with_mlflow:.2f} s with MLflow, {without:.2f} s without "
          f"-> ratio {with_mlflow / without:.3f}")


if __name__ == "__main__":
    main()

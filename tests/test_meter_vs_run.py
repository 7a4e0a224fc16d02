"""A hand-written loop with dbx.DiversityMeter and dbx.AdaptiveBatchSize gets the diversity and the batch
sizes that `dbx run` logs, on the same data, weights and order: AdamW, gradient clipping at a
threshold the gradients do reach, micro-batches, bf16 autocast, DiveBatch with the square-root lr rule.

The clipping sits where a real loop puts it, after ``meter.step()``: the statistic is of the
unclipped per-sample gradients in both, so the two agree only if both read the step before clipping.
"""
import textwrap

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import dbx
from dbx.cli import main
from dbx.spec import load_spec
from dbx.train.parts import build_parts

SPEC = """\
name: meter-vs-run
seed: 3
device: cpu
data: {name: synthetic_logistic, params: {n: 500, d: 12, noise: 0.5}}
model: {name: mlp, params: {widths: [16]}}
optimizer: {name: adamw, params: {lr: 0.01, weight_decay: 0.01}}
clip_grad_norm: 0.05
epochs: 4
policy: {name: divebatch, params: {initial: 16, max: 200, delta: 0.3, resize_every: 1}}
estimator: {name: exact}
lr_scaling: sqrt
max_micro_batch: 12
amp: bf16
checkpoint: {enabled: false}
tracking: {system_metrics: false}
"""
POLICY = {"initial": 16, "max": 200, "delta": 0.3, "resize_every": 1}


def logged_by_dbx_run(folder):
    from mlflow import MlflowClient

    uri = f"sqlite:///{folder}/mlflow.db"
    result = CliRunner().invoke(main, ["run", str(folder / "spec.yaml"), "--tracking-uri", uri],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
            for key in ("diversity", "batch_size", "lr", "grad_norm")}


def hand_written_loop(folder):
    parts = build_parts(load_spec(folder / "spec.yaml"), torch.device("cpu"))  # the run's data, weights, order
    model, loader = parts.model, parts.train_loader
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    meter = dbx.DiversityMeter(model)
    adaptive = dbx.AdaptiveBatchSize("divebatch", POLICY, dataset_size=loader.num_samples, lr_scaling="sqrt")
    seen = {"diversity": [], "batch_size": [], "lr": [], "grad_norm": []}
    for epoch in range(1, 5):
        loader.set_batch_size(adaptive.batch_size)
        lr = 0.01 * adaptive.lr_scale
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        norms = []
        measured = adaptive.measures_in(epoch)
        with meter.epoch(measure=measured):
            for x, y in loader:
                for xm, ym in zip(x.split(12), y.split(12)):
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        out = model(xm)
                    (F.cross_entropy(out.float(), ym, reduction="sum") / len(x)).backward()
                meter.step()
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if measured:  # DiveBatch stops measuring once B is at its maximum; dbx run logs nothing then
            seen["diversity"].append(meter.diversity)
        seen["batch_size"].append(float(adaptive.batch_size))
        seen["lr"].append(lr)
        seen["grad_norm"].append(sum(norms) / len(norms))
        adaptive.end_epoch(epoch, meter.result if measured else None)
    return seen


def test_the_meter_in_a_hand_written_loop_gets_what_dbx_run_logs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(textwrap.dedent(SPEC))
    run = logged_by_dbx_run(tmp_path)
    mine = hand_written_loop(tmp_path)
    assert len(set(run["batch_size"])) >= 3, run  # the batch size really changed, more than once
    assert mine["batch_size"] == run["batch_size"]
    assert mine["lr"] == pytest.approx(run["lr"], rel=1e-12)
    assert mine["diversity"] == pytest.approx(run["diversity"], rel=1e-5)
    assert min(run["grad_norm"]) > 0.05  # the clipping really acted on every epoch's steps, on average
    assert mine["grad_norm"] == pytest.approx(run["grad_norm"], rel=1e-4)

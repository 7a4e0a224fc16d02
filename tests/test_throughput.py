"""The loop measures how fast each batch size trains and hands it to the policy (EpochState.throughput)."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dbx.cli import main
from dbx.protocols import DiversityEstimate
from dbx.spec import spec_from_dict
from dbx.train import throughput
from dbx.train.checkpoint import restore, snapshot
from dbx.train.loop import fit
from dbx.train.parts import build_parts

SPEC = {
    "name": "tiny", "seed": 0, "device": "cpu",
    "data": {"name": "synthetic_logistic", "params": {"n": 400, "d": 8}},
    "model": {"name": "logreg"}, "optimizer": {"lr": 0.1}, "epochs": 4,
    "policy": {"name": "adabatch", "params": {"initial": 8, "max": 32, "every": 1, "factor": 2}},
    "checkpoint": {"enabled": False}, "tracking": {"system_metrics": False},
}


class Quiet:
    def log_epoch(self, epoch, metrics):
        pass


class Recording:
    """A policy wrapper that keeps every EpochState the loop passes."""

    def __init__(self, policy):
        self.policy, self.states = policy, []
        self.uses_diversity = policy.uses_diversity

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def next_batch_size(self, state, diversity):
        self.states.append(state)
        return self.policy.next_batch_size(state, diversity)


def test_the_table_keeps_each_sizes_fastest_epoch_without_the_estimators_own_time():
    table = {}
    throughput.record(table, 32, samples=3200, seconds=2.0)
    throughput.record(table, 32, samples=3200, seconds=8.0)  # a slow epoch: the machine was busy
    throughput.record(table, 128, samples=3200, seconds=1.5, diversity=DiversityEstimate(value=0.1, samples=3200,
                                                                                          seconds=0.5))
    throughput.record(table, 256, samples=0, seconds=1.0)  # nothing trained: nothing recorded
    assert throughput.samples_per_second(table) == {32: 1600.0, 128: 3200.0}
    [row32, row128] = throughput.as_records(table)
    assert row32 == {"batch_size": 32, "epochs": 2, "samples": 6400, "seconds": 10.0,
                     "mean_samples_per_second": 640.0, "best_samples_per_second": 1600.0,
                     "mean_seconds_per_step": 0.05}
    assert row128["seconds"] == 1.0


def test_the_policy_sees_every_batch_size_trained_so_far_and_a_resume_keeps_the_table():
    spec = spec_from_dict(SPEC)
    parts = build_parts(spec, torch.device("cpu"))
    parts.policy = recording = Recording(parts.policy)
    state_after = {}
    fit(spec, parts, Quiet(), say=lambda line: None,
        on_epoch_end=lambda state: state_after.setdefault(state.epoch, snapshot(spec, parts, state)))
    tables = [s.throughput for s in recording.states]
    assert [sorted(t) for t in tables] == [[8], [8, 16], [8, 16, 32], [8, 16, 32]]
    assert all(rate > 0 for t in tables for rate in t.values())
    assert tables[3][32] >= tables[2][32]  # the fastest of the epochs at 32 so far

    fresh = build_parts(spec, torch.device("cpu"))
    resumed = restore(fresh, state_after[2])
    assert throughput.samples_per_second(resumed.throughput) == tables[1]


@pytest.mark.slow
def test_a_goodput_run_logs_its_reasons_and_the_throughput_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "goodput.yaml"
    spec.write_text(json.dumps({**SPEC, "epochs": 3, "checkpoint": {"enabled": True},
                                "policy": {"name": "goodput", "params": {"initial": 8, "max": 64}},
                                "estimator": {"name": "subsampled", "params": {"samples": 256}}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["run", str(spec), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    for key in ("policy/efficiency", "policy/predicted_goodput"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 3, key
    # The noise scale is logged only where it is finite: the unbiased ||G||^2 of 256 sampled gradients
    # can come out <= 0 near convergence, and which epoch that happens in depends on the batch sizes the
    # measured timings chose on this machine.
    noise = client.get_metric_history(run.info.run_id, "policy/noise_scale")
    assert 1 <= len(noise) <= 3 and all(m.value > 0 for m in noise)
    sizes = sorted({int(m.value) for m in client.get_metric_history(run.info.run_id, "batch_size")})
    rows = json.loads(Path(client.download_artifacts(run.info.run_id, "throughput.json", str(tmp_path))).read_text())
    assert [row["batch_size"] for row in rows] == sizes
    assert sum(row["epochs"] for row in rows) == 3 and all(row["best_samples_per_second"] > 0 for row in rows)

    # resume from epoch 2: the table comes back with the checkpoint, and the replayed decision agrees
    [folder] = (tmp_path / "dbx-checkpoints").iterdir()
    (folder / "epoch-0003.ckpt").unlink()
    result = CliRunner().invoke(main, ["resume", run.info.run_id, "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert "after epoch 2" in result.output and "WARNING" not in result.output

"""The run-level speed options: ``compile: true`` trains the curves an eager run trains (its
measuring epochs run eagerly, so the estimator's diversity is the same too), and
``cuda_graphs: true`` on a machine without CUDA is an input error (exit 2) before anything runs.
Their CUDA behaviour is tested in tests/test_cuda.py."""
import pytest
import torch
from click.testing import CliRunner

from dbx.cli import main
from dbx.errors import UserError
from dbx.spec import spec_from_dict
from dbx.train.loop import fit
from dbx.train.parts import build_parts

BASE = {
    "name": "options", "seed": 1, "device": "cpu", "epochs": 3, "eval_batch_size": 64,
    "data": {"name": "synthetic_logistic", "params": {"n": 500, "d": 8}},  # 400 training samples
    "model": {"name": "mlp", "params": {"widths": [8]}}, "optimizer": {"lr": 0.1, "momentum": 0.9},
    # B grows 16 -> 32 -> 64 (a compiled model must not recompile per size), the last batch is short
    "policy": {"name": "adabatch", "params": {"initial": 16, "max": 64, "every": 1, "factor": 2}},
    "checkpoint": {"enabled": False}, "tracking": {"system_metrics": False},
}


class Recorder:
    def __init__(self):
        self.epochs = []

    def log_epoch(self, epoch, metrics):
        self.epochs.append(metrics)


def curves(**extra):
    spec = spec_from_dict({**BASE, **extra})
    parts = build_parts(spec, torch.device("cpu"))
    recorder = Recorder()
    fit(spec, parts, recorder, say=lambda line: None)
    return parts, recorder.epochs


KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "batch_size")


@pytest.mark.slow
def test_a_compiled_run_trains_the_eager_runs_curves():
    torch._dynamo.reset()
    eager_parts, eager = curves()
    parts, compiled = curves(compile=True)
    assert parts.compiled is not None and eager_parts.compiled is None
    assert [m["batch_size"] for m in compiled] == [16.0, 32.0, 64.0]
    for epoch, (got, want) in enumerate(zip(compiled, eager), start=1):
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), f"epoch {epoch} {key}"


@pytest.mark.slow
def test_compiled_runs_measure_eagerly_with_the_estimators_hooks():
    torch._dynamo.reset()
    measuring = {"policy": {"name": "divebatch", "params": {"initial": 16, "max": 64, "resize_every": 1}}}
    _, eager = curves(**measuring)
    _, compiled = curves(compile=True, **measuring)
    assert all("diversity" in m for m in compiled)
    for got, want in zip(compiled, eager):
        assert got["diversity"] == pytest.approx(want["diversity"], rel=1e-4)
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)


def test_cuda_graphs_on_the_cpu_is_an_input_error(tmp_path, monkeypatch):
    spec = spec_from_dict({**BASE, "cuda_graphs": True})
    with pytest.raises(UserError, match="cuda_graphs: true needs a CUDA device"):
        build_parts(spec, torch.device("cpu"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "graphs.yaml"
    path.write_text("name: g\nseed: 0\ndevice: cpu\nepochs: 1\ncuda_graphs: true\n"
                    "data: {name: synthetic_logistic, params: {n: 100, d: 4}}\nmodel: {name: logreg}\n"
                    "optimizer: {lr: 0.1}\npolicy: {name: fixed, params: {batch_size: 16}}\n"
                    "tracking: {system_metrics: false}\n")
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "cuda_graphs: true needs a CUDA device" in result.output


def test_the_speed_options_are_strict_booleans():
    with pytest.raises(Exception, match="compile"):
        spec_from_dict({**BASE, "compile": "yes"})
    assert spec_from_dict(BASE).compile is False and spec_from_dict(BASE).cuda_graphs is False

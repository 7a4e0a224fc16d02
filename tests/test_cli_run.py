"""`dbx run`, `dbx validate` and `dbx plugins` as a user drives them, in-process (click's CliRunner),
against a real MLflow sqlite store in a temporary folder."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from dbx.cli import main

TINY = """\
name: tiny
seed: 0
device: cpu
data: {name: synthetic_logistic, params: {n: 600, d: 8, noise: 0.1}}
model: {name: logreg}
optimizer: {lr: 0.2, momentum: 0.9, weight_decay: 5e-4}
epochs: 4
policy: {name: divebatch, params: {initial: 8, max: 256, delta: 1.0, resize_every: 1}}
estimator: {name: exact}
target_accuracy: 0.6
tracking: {system_metrics: false}
"""

EPOCH_METRICS = {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "batch_size", "lr", "diversity",
                 "epoch_seconds", "eval_seconds", "wall_seconds", "samples_seen", "optimizer_steps"}
SUMMARY_METRICS = {"final_test_accuracy", "best_test_accuracy", "epochs_to_target", "seconds_to_target"}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current folder: the default ./mlflow.db would land here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def write_spec(folder: Path, text: str = TINY, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def dbx(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def runs_in(uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    return client, client.search_runs([e.experiment_id for e in experiments]) if experiments else []


def test_run_records_a_finished_run_with_every_number(workdir):
    result = dbx("run", str(write_spec(workdir)))
    assert result.exit_code == 0, result.output
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in result.output
    [summary_line] = [line for line in result.output.splitlines() if line.startswith("summary: ")]
    assert "final_test_accuracy" in summary_line and "perplexity" not in summary_line  # no nulls for other tasks

    client, runs = runs_in(uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny-seed0"
    assert EPOCH_METRICS | SUMMARY_METRICS <= set(run.data.metrics)
    sizes = [m.value for m in client.get_metric_history(run.info.run_id, "batch_size")]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_loss")] == [1, 2, 3, 4]
    assert len(set(sizes)) >= 2 and sizes == sorted(sizes)
    assert run.data.params["optimizer.weight_decay"] == "0.0005"  # 5e-4 read as a number
    assert run.data.params["policy.name"] == "divebatch"
    assert run.data.tags["dbx.plugin.policy"].startswith("divebatch (dbx ")
    assert "torch.version" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec", "summary.json", "plots"} <= artifacts
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert Path(experiment.artifact_location.removeprefix("file://")).is_absolute()


def test_set_overrides_the_spec_with_typed_values(workdir):
    result = dbx("run", str(write_spec(workdir)), "--set", "epochs=2", "--set", "policy.name=fixed",
                 "--set", "policy.params={batch_size: 32}")
    assert result.exit_code == 0, result.output
    _, [run] = runs_in(f"sqlite:///{workdir / 'mlflow.db'}")
    assert run.data.metrics["samples_seen"] == 2 * 480
    assert run.data.metrics["batch_size"] == 32


BAD_SPEC = """\
name: bad
seed: zero
data: {name: synthetic_logistic}
model: {name: logreg}
optimizer: {lr: 0.1}
epocs: 3
policy: {name: divebach}
"""


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_bad_spec_reports_every_problem_with_file_and_line_and_starts_nothing(workdir, command):
    spec = write_spec(workdir, BAD_SPEC, "bad.yaml")
    result = CliRunner().invoke(main, [command, str(spec)])
    assert result.exit_code == 2
    output = result.output
    assert f"{spec}:2: seed:" in output  # wrong type
    assert f"{spec}:6: epocs: unknown key 'epocs'. Did you mean 'epochs'?" in output
    assert f"{spec}:7: policy.name:" in output and "Did you mean 'divebatch'?" in output
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlartifacts").exists()


def test_validate_accepts_a_good_spec(workdir):
    result = dbx("validate", str(write_spec(workdir)))
    assert result.exit_code == 0 and "ok" in result.output


def test_bad_plugin_params_point_at_their_line(workdir):
    spec = write_spec(workdir, TINY.replace("delta: 1.0", "delta: 1.0, delt: 2"))
    result = CliRunner().invoke(main, ["validate", str(spec)])
    assert result.exit_code == 2
    assert f"{spec}:8: policy.params.delt: unknown parameter 'delt'" in result.output


def test_cuda_asked_for_and_absent_is_an_input_error(workdir):
    result = CliRunner().invoke(main, ["run", str(write_spec(workdir)), "--device", "cuda:99"])
    assert result.exit_code == 2
    assert "cuda:99" in result.output and ("not available" in result.output or "does not exist" in result.output)
    assert not (workdir / "mlflow.db").exists()


def test_a_diverging_run_is_marked_failed_with_the_reason(workdir):
    spec = write_spec(workdir, TINY.replace("lr: 0.2", "lr: 1.0e12").replace("synthetic_logistic", "synthetic_linear")
                      .replace("target_accuracy: 0.6", "target_accuracy: null"))
    result = CliRunner().invoke(main, ["run", str(spec)])
    assert result.exit_code == 1
    assert "diverged" in result.output
    _, [run] = runs_in(f"sqlite:///{workdir / 'mlflow.db'}")
    assert run.info.status == "FAILED"
    assert run.data.tags["dbx.failure.reason"] == "nonfinite_loss"
    assert run.data.tags["dbx.failure.epoch"] == "1"


def test_an_unwritable_store_is_an_input_error(workdir):
    result = CliRunner().invoke(main, ["run", str(write_spec(workdir)), "--tracking-uri",
                                       f"sqlite:///{workdir}/no/such/folder/mlflow.db"])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_plugins_lists_each_group_with_its_distribution():
    result = dbx("plugins", "--check")
    assert result.exit_code == 0, result.output
    for name in ("divebatch", "adabatch", "fixed", "exact", "logreg", "mlp", "synthetic_logistic"):
        assert name in result.output
    assert "all plugins load" in result.output


def test_help_teaches_and_imports_neither_torch_nor_mlflow():
    code = textwrap.dedent("""
        import sys
        from click.testing import CliRunner
        from dbx.cli import main
        for args in (["--help"], ["run", "--help"], ["validate", "--help"], ["plugins", "--help"]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
        assert "Examples" in CliRunner().invoke(main, ["run", "--help"]).output
        heavy = sorted(m for m in ("torch", "mlflow") if m in sys.modules)
        print("heavy:", heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "heavy: []" in out.stdout


def test_validate_checks_every_point_of_a_sweep(workdir):
    spec = write_spec(workdir, TINY + "sweep:\n  policy.name: [fixed, divebach]\n  epochs: [1, 0]\n")
    result = CliRunner().invoke(main, ["validate", str(spec)])
    assert result.exit_code == 2
    assert f"{spec}:13: policy.name: unknown policy 'divebach'" in result.output
    assert f"{spec}:14: epochs: must be > 0, got 0 (sweep point epochs=0)" in result.output


def test_dry_run_lists_the_sweep_and_starts_nothing(workdir):
    spec = write_spec(workdir, TINY + "sweep:\n  seed: [0, 1]\n")
    result = dbx("run", str(spec), "--dry-run")
    assert result.exit_code == 0
    assert "tiny-seed0" in result.output and "tiny-seed1" in result.output and "2 run(s)" in result.output
    assert list(workdir.iterdir()) == [spec]


def test_bf16_autocast_trains_on_the_cpu_and_fp16_asks_for_cuda(workdir):
    spec = write_spec(workdir, TINY + "amp: bf16\n")
    result = dbx("run", str(spec), "--set", "epochs=2")
    assert result.exit_code == 0, result.output
    _, [run] = runs_in(f"sqlite:///{workdir / 'mlflow.db'}")
    assert run.data.params["amp"] == "bf16" and run.data.metrics["test_accuracy"] > 0.5

    result = CliRunner().invoke(main, ["run", str(write_spec(workdir, TINY + "amp: fp16\n", "fp16.yaml"))])
    assert result.exit_code == 2 and "fp16 needs a CUDA device" in result.output


def test_a_folder_as_tracking_store_gets_told_to_use_a_database(workdir):
    result = CliRunner().invoke(main, ["run", str(write_spec(workdir)), "--tracking-uri", str(workdir / "runs")])
    assert result.exit_code == 2 and "sqlite:///" in result.output

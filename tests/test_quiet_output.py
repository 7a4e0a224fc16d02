"""MLflow's own INFO lines (creating the database, migrating it, the system-metrics thread) show
only with --debug: a run's output is dbx's lines."""
import os
import subprocess
import sys

from click.testing import CliRunner

from dbx.cli import main

SPEC = """\
name: quiet
device: cpu
data: {name: synthetic_logistic, params: {n: 200, d: 4}}
model: {name: logreg}
optimizer: {lr: 0.1}
epochs: 1
policy: {name: fixed, params: {batch_size: 50}}
tracking: {system_metrics: true}
"""


def test_a_run_on_a_fresh_store_prints_no_mlflow_lines(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_LOGGING_LEVEL")}
    done = subprocess.run([sys.executable, "-m", "dbx.cli", "run", "spec.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert "epoch 1/1" in output and "done." in output
    assert "mlflow" not in done.stderr.lower(), done.stderr  # no database creation, no system-metrics thread
    assert " INFO " not in output


def test_debug_shows_them(tmp_path, monkeypatch):
    """In-process too: MLflow's handler writes to the (captured) stderr of the moment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "spec.yaml").write_text(SPEC)
    quiet = CliRunner().invoke(main, ["run", "spec.yaml", "--tracking-uri", f"sqlite:///{tmp_path / 'a.db'}"])
    assert quiet.exit_code == 0, quiet.output
    assert " INFO " not in quiet.output, quiet.output
    try:
        loud = CliRunner().invoke(main, ["run", "spec.yaml", "--debug", "--tracking-uri", f"sqlite:///{tmp_path / 'b.db'}"])
    finally:
        CliRunner().invoke(main, ["runs", "--tracking-uri", f"sqlite:///{tmp_path / 'a.db'}"])  # quiet again
    assert loud.exit_code == 0, loud.output
    assert "INFO mlflow.store.db.utils: Creating initial MLflow database tables" in loud.output
    assert "INFO mlflow.system_metrics" in loud.output

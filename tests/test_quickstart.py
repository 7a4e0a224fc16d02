"""The README's main job, as a user runs it: the installed `dbx` script on the quickstart spec,
with MLflow's default store in the current folder."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_runs_and_leaves_a_finished_run_whose_batch_size_grew(tmp_path):
    dbx = Path(sys.executable).with_name("dbx")
    assert dbx.exists(), "the dbx console script is not installed (pip install -e .)"
    done = subprocess.run([str(dbx), "run", str(REPO / "experiments" / "quickstart.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in done.stdout

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED"
    sizes = [m.value for m in client.get_metric_history(run.info.run_id, "batch_size")]
    assert len(sizes) == 12 and len(set(sizes)) >= 2
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "diversity", "epoch_seconds",
                "eval_seconds", "wall_seconds", "samples_seen", "optimizer_steps", "final_test_accuracy",
                "best_test_accuracy", "epochs_to_target", "seconds_to_target"):
        assert key in run.data.metrics, key

"""Fixtures shared by the test files."""
import os

import pytest

from dbx import registry


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path to install small distributions into (see distributions.py); the
    registry rescans before and after. The current folder is the empty tmp_path."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry.refresh()
    yield folder
    registry.refresh()


@pytest.fixture
def fresh_mlflow(monkeypatch):
    """MLflow's process-wide tracking URI and experiment unset for the test, and no run left active after it: code that
    calls mlflow.set_tracking_uri (docs examples, Lightning's or Hugging Face's MLflow loggers) must not
    send later tests' runs into this test's store, nor this test's into theirs."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)  # set by mlflow.set_experiment
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
    saved = {name: os.environ.pop(name, None) for name in names}  # set_experiment exports the id
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value

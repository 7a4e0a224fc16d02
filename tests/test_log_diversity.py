"""dbx.log_diversity: the meter's values into the active MLflow run (a real sqlite store)."""
import mlflow
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dbx
from dbx.errors import UserError


def test_log_diversity_writes_one_value_per_epoch_into_the_active_run(tmp_path, fresh_mlflow):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    meter = dbx.DiversityMeter(model)
    with mlflow.start_run() as run:
        for epoch in (1, 2):
            with meter.epoch():
                for xb, yb in zip(x.split(8), y.split(8)):
                    F.cross_entropy(model(xb), yb).backward()
                    meter.step()
                    model.zero_grad()
            logged = dbx.log_diversity(meter, step=epoch, per_layer=True, extra={"batch_size": 8})
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "diversity")
    assert [m.step for m in history] == [1, 2] and history[-1].value == pytest.approx(meter.diversity)
    assert client.get_metric_history(run.info.run_id, "diversity/0")[-1].value == pytest.approx(meter.per_layer["0"])
    assert logged["batch_size"] == 8.0 and logged["diversity_samples"] == 32.0


def test_log_diversity_without_an_active_run_says_how_to_start_one(tmp_path, fresh_mlflow):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(UserError, match="no active MLflow run.*mlflow.start_run"):
        dbx.log_diversity(dbx.DiversityEstimate(value=1.0, samples=4, seconds=0.0))

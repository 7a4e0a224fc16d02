"""A third-party optimizer: a tiny distribution, built and installed by pip (into a folder of its own on
sys.path, so nothing outlives the test), registers it in ``dbx.optimizers``; dbx lists it with its
distribution, checks a spec's params against its constructor, and trains with it."""
import importlib
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from dbx import registry
from dbx.cli import main
from dbx.train.checkpoint import list_checkpoints, read_checkpoint

SETUP_CFG = """\
[metadata]
name = dbx-signsgd
version = 0.1.0

[options]
py_modules = dbx_signsgd

[options.entry_points]
dbx.optimizers =
    signsgd = dbx_signsgd:SignSGD
"""

MODULE = '''\
"""signSGD with momentum (Bernstein et al. 2018): step by the sign of the momentum buffer."""
import torch


class SignSGD(torch.optim.Optimizer):
    lr_scaling = "sqrt"  # what dbx's lr_scaling: auto applies to it

    def __init__(self, params, lr: float = 1e-3, *, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "buffer" not in state:
                    state["buffer"] = torch.zeros_like(p)
                    state["sign_steps"] = 0
                state["buffer"].mul_(group["momentum"]).add_(p.grad, alpha=1 - group["momentum"])
                p.add_(state["buffer"].sign(), alpha=-group["lr"])
                state["sign_steps"] += 1
'''

SPEC = """\
name: signsgd-run
seed: 0
device: cpu
data: {{name: synthetic_logistic, params: {{n: 400, d: 8, noise: 0.1}}}}
model: {{name: logreg}}
optimizer: {optimizer}
epochs: 2
policy: {{name: fixed, params: {{batch_size: 50}}}}
tracking: {{system_metrics: false}}
"""


@pytest.fixture(scope="module")
def signsgd(tmp_path_factory):
    """dbx-signsgd, built and installed by pip into its own folder, that folder on sys.path."""
    source = tmp_path_factory.mktemp("dbx-signsgd")
    (source / "setup.cfg").write_text(SETUP_CFG)
    (source / "setup.py").write_text("from setuptools import setup\nsetup()\n")
    (source / "dbx_signsgd.py").write_text(MODULE)
    site = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                             "--no-deps", "--no-build-isolation", "--target", str(site), str(source)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    registry.refresh()
    yield site
    sys.path.remove(str(site))
    sys.modules.pop("dbx_signsgd", None)
    registry.refresh()


def test_it_is_listed_with_its_distribution(signsgd):
    info = registry.info("optimizer", "signsgd")
    assert (info.distribution, info.version, info.target) == ("dbx-signsgd", "0.1.0", "dbx_signsgd:SignSGD")
    result = CliRunner().invoke(main, ["plugins", "--check"])
    assert "signsgd" in result.output and "dbx-signsgd" in result.output and "all plugins load" in result.output


def test_its_params_are_checked_against_its_constructor(signsgd, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.format(optimizer="{name: signsgd, params: {lr: 0.01, momentun: 0.9}}"))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert (f"{path}:6: optimizer.params.momentun: unknown parameter 'momentun' for optimizer 'signsgd'. "
            "Did you mean 'momentum'?") in result.output
    path.write_text(SPEC.format(optimizer="{name: signsgd, params: {lr: 0.01, momentum: high}}"))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and f"{path}:6: optimizer.params.momentum:" in result.output
    assert "signsgd expects float" in result.output


def test_a_run_trains_with_it_and_its_state_is_checkpointed(signsgd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.format(optimizer="{name: signsgd, params: {lr: 0.01, momentum: 0.5}}"))
    result = CliRunner().invoke(main, ["run", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("signsgd-run").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["dbx.plugin.optimizer"] == "signsgd (dbx-signsgd 0.1.0)"
    [folder] = (tmp_path / "dbx-checkpoints").iterdir()
    state = read_checkpoint(list_checkpoints(folder)[-1])["optimizer"]
    assert state["param_groups"][0]["momentum"] == 0.5
    assert {s["sign_steps"] for s in state["state"].values()} == {14}  # 320 samples at B = 50: 7 steps, 2 epochs
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert losses[1] < losses[0]
    assert torch.optim.Optimizer in type(registry.load("optimizer", "signsgd")(
        [torch.zeros(1, requires_grad=True)])).__mro__

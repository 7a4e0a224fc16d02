"""Specs written before optimizers had names (``optimizer: {lr, momentum, weight_decay, nesterov}``)
validate and train exactly as they did: one of today's experiments, run by `dbx run`, against the same
spec in the new form and against SGD written out by hand."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_reliability import final_weights, only_run, store

from dbx.checks import check_spec_file
from dbx.cli import main
from dbx.data.synthetic import synthetic_logistic
from dbx.models.linear import logreg

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
SPEC = EXPERIMENTS / "synthetic" / "sgd_small.yaml"  # optimizer: {lr: 0.2, momentum: 0.9, weight_decay: 0}
SMALL = ["epochs=2", "data.params.n=600", "data.params.d=16", "checkpoint.keep_last=1"]
CURVES = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "batch_size")


def run(folder: Path, *overrides: str):
    folder.mkdir()
    args = ["run", str(SPEC), "--tracking-uri", store(folder)]
    for override in (*SMALL, *overrides):
        args += ["--set", override]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    client, found = only_run(store(folder))
    curves = {key: [m.value for m in sorted(client.get_metric_history(found.info.run_id, key), key=lambda m: m.step)]
              for key in CURVES}
    return found, curves, final_weights(folder)


def sgd_by_hand(seed: int, epochs: int, batch_size: int, lr: float) -> dict[str, torch.Tensor]:
    """What dbx did before this version: torch.optim.SGD(momentum=0.9), the mean cross-entropy of
    each batch, batches drawn from a permutation of a generator seeded with the run's seed."""
    torch.manual_seed(seed)
    data = synthetic_logistic(n=600, d=16, noise=0.05, seed=seed)
    model = logreg(num_classes=2, input_shape=(16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0, nesterov=False)
    x, y = data.train
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=order).split(batch_size):
            (F.cross_entropy(model(x[index]), y[index], reduction="sum") * (1.0 / len(index))).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {f"{k}": v for k, v in model.state_dict().items()}


def test_a_spec_of_the_previous_version_validates_with_its_old_meaning():
    spec = check_spec_file(str(SPEC))
    assert (spec.optimizer.name, spec.optimizer.lr, spec.optimizer.momentum) == ("sgd", 0.2, 0.9)
    assert spec.optimizer.constructor_kwargs() == {"momentum": 0.9, "weight_decay": 0.0, "nesterov": False, "lr": 0.2}
    assert spec.loss.name is None and spec.clip_grad_norm is None and spec.lr_scaling == "none"


@pytest.mark.slow
def test_todays_experiment_trains_as_before_in_both_forms_and_as_sgd_by_hand(tmp_path):
    old_form, old_curves, old_weights = run(tmp_path / "old")
    new_form, new_curves, new_weights = run(
        tmp_path / "new", "optimizer={name: sgd, params: {lr: 0.2, momentum: 0.9, weight_decay: 0}}")
    assert old_form.data.params["optimizer.momentum"] == "0.9"  # logged as before
    assert new_curves == old_curves  # bit for bit
    by_hand = sgd_by_hand(seed=0, epochs=2, batch_size=32, lr=0.2)
    for name, tensor in by_hand.items():
        assert torch.equal(old_weights[name], tensor), name
        assert torch.equal(new_weights[name], tensor), name

"""dbx's own transformers and recurrent model: the small GPT and ViT are measured exactly by the hooks
(checked against explicit per-sample gradients), the LSTM by the subsampled estimator."""
import re

import pytest
import torch
from click.testing import CliRunner

from dbx.cli import main
from dbx.errors import UserError
from dbx.estimators import ExactEstimator, per_sample_sq_norms
from dbx.models.recurrent import lstm_classifier
from dbx.models.transformer import transformer_lm, vit
from dbx.train.losses import cross_entropy
from dbx.train.tasks import Task

SEQUENCE = Task("sequence", cross_entropy()).loss_fn
CLASSES = Task("classification", cross_entropy()).loss_fn


def hooks_and_explicit(model, loss_fn, x, y):
    return (per_sample_sq_norms(model, loss_fn, x, y, method="hooks").total,
            per_sample_sq_norms(model, loss_fn, x, y, method="func").total)


def test_the_gpt_is_causal_and_its_per_sequence_norms_come_exactly_from_the_hooks():
    torch.manual_seed(0)
    model = transformer_lm(num_classes=20, input_shape=(8,), width=16, depth=2, heads=2)
    x = torch.randint(0, 20, (5, 8))
    changed = x.clone()
    changed[:, 5] = (x[:, 5] + 1) % 20
    with torch.no_grad():
        assert torch.equal(model(x)[:, :5], model(changed)[:, :5])  # no position sees the future
    hooks, explicit = hooks_and_explicit(model, SEQUENCE, x, torch.randint(0, 20, (5, 8)))
    torch.testing.assert_close(hooks, explicit, rtol=1e-4, atol=1e-6)


def test_the_vit_norms_come_exactly_from_the_hooks_at_28_and_32_pixels():
    for shape, patch in (((1, 28, 28), 7), ((3, 32, 32), 8)):
        torch.manual_seed(0)
        model = vit(num_classes=10, input_shape=shape, patch=patch, width=16, depth=1, heads=2)
        hooks, explicit = hooks_and_explicit(model, CLASSES, torch.randn(3, *shape), torch.randint(0, 10, (3,)))
        torch.testing.assert_close(hooks, explicit, rtol=1e-4, atol=1e-6)


def test_a_tied_head_is_measured_exactly_by_summing_both_uses_before_squaring():
    torch.manual_seed(0)
    model = transformer_lm(num_classes=20, input_shape=(8,), width=16, depth=1, heads=2, tie_head=True)
    assert model.head.weight is model.tokens.weight
    x, y = torch.randint(0, 20, (5, 8)), torch.randint(0, 20, (5, 8))
    hooks, explicit = hooks_and_explicit(model, SEQUENCE, x, y)
    torch.testing.assert_close(hooks, explicit, rtol=1e-4, atol=1e-6)
    with pytest.raises(UserError, match="shared between modules"):  # one use alone would be wrong: refused
        per_sample_sq_norms(model, SEQUENCE, x, y, exclude=["head"])
    with pytest.raises(UserError, match="shared between modules"):  # without the fallback: refused by name
        ExactEstimator(fallback=False).attach(model)


@pytest.mark.parametrize("factory, kwargs, fragment", [
    (transformer_lm, {"num_classes": 10, "input_shape": (1, 8, 8)}, "needs sequence data"),
    (transformer_lm, {"num_classes": 10, "input_shape": (8,), "width": 30, "heads": 4}, "multiple of heads"),
    (transformer_lm, {"num_classes": 10, "input_shape": (8,), "context": 4}, "shorter than the data's sequences"),
    (vit, {"num_classes": 10, "input_shape": (1, 28, 28), "patch": 8}, "multiples of patch (8)"),
    (lstm_classifier, {"num_classes": 10, "input_shape": (4, 4, 4, 4)}, "lstm_classifier reads"),
])
def test_shapes_a_model_cannot_take_are_refused_at_construction(factory, kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        factory(**kwargs)


def test_the_lstm_reads_images_by_rows_sequences_as_they_are_and_tokens_through_an_embedding():
    assert lstm_classifier(num_classes=3, input_shape=(1, 8, 6))(torch.randn(2, 1, 8, 6)).shape == (2, 3)
    model = lstm_classifier(num_classes=3, input_shape=(5, 4), bidirectional=True, layers=2)
    assert model(torch.randn(2, 5, 4)).shape == (2, 3)
    assert lstm_classifier(num_classes=None, input_shape=(7,), vocab_size=12)(torch.randint(0, 12, (2, 7))).shape == (2, 1)


SPEC = """\
name: {name}
seed: 0
device: cpu
data: {{name: digits, subset: 200}}
model: {model}
optimizer: {{name: adamw, params: {{lr: 3e-3}}}}
epochs: 2
policy: {{name: divebatch, params: {{initial: 8, max: 64, delta: 1.0, resize_every: 1}}}}
estimator: {estimator}
tracking: {{system_metrics: false}}
"""


@pytest.mark.parametrize("name, model, estimator", [
    ("vit-exact", "{name: vit, params: {patch: 2, width: 16, depth: 1, heads: 2}}", "{name: exact}"),
    ("lstm-subsampled", "{name: lstm_classifier, params: {hidden: 16}}", "{name: subsampled, params: {samples: 64}}"),
])
def test_divebatch_trains_them_by_dbx_run(tmp_path, monkeypatch, name, model, estimator):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.format(name=name, model=model, estimator=estimator))
    result = CliRunner().invoke(main, ["run", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    diversity = [m.value for m in client.get_metric_history(run.info.run_id, "diversity")]
    assert run.info.status == "FINISHED" and diversity and all(d > 0 for d in diversity)

"""Tasks: how the loop forms a step's loss for classification, regression and sequences, and why the
diversity estimators stay exact for sequences (per-sequence gradients, token-mean loss, ignored tokens,
micro-batches)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dbx.data.loader import make_loader
from dbx.errors import UserError
from dbx.estimators import ExactEstimator, per_sample_grads_func
from dbx.models.transformer import transformer_lm
from dbx.protocols import DataSplits
from dbx.spec import LossSpec
from dbx.train.loop import evaluate, train_one_epoch
from dbx.train.parts import Parts
from dbx.train.tasks import build_task, infer_task, perplexity

VOCAB, LENGTH = 11, 6


def token_data(n: int = 24, ignored: bool = False, seed: int = 0) -> DataSplits:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    y = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    if ignored:  # padding at the end of some sequences, as token-classification data has
        y[::3, -2:] = -100
    return DataSplits(train=(x, y), test=(x[:8], y[:8]), num_classes=VOCAB, input_shape=(LENGTH,))


def lm_parts(data: DataSplits, batch_size: int, lr: float = 0.0, loss: LossSpec | None = None) -> Parts:
    torch.manual_seed(0)
    model = transformer_lm(num_classes=VOCAB, input_shape=(LENGTH,), width=16, depth=1, heads=2)
    loader = make_loader(data.train, batch_size=batch_size, shuffle=True, device="cpu", seed=0)
    test_loader = make_loader(data.test, batch_size=5, shuffle=False, device="cpu", seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return Parts(data, model, optimizer, None, None, loader, test_loader, build_task(loss or LossSpec(), data),
                 torch.device("cpu"))


def oracle_diversity(model, loss_fn, x, y) -> float:
    grads = per_sample_grads_func(model, loss_fn, x, y)
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1).double()
    return flat.square().sum().item() / flat.sum(0).square().sum().item()


def test_the_task_is_what_the_data_implies():
    assert infer_task(token_data()) == "sequence"
    labels = DataSplits(train=(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)), test=None, num_classes=2,
                        input_shape=(3,))
    assert infer_task(labels) == "classification"
    values = DataSplits(train=(torch.zeros(4, 3), torch.zeros(4, 1)), test=None, num_classes=None, input_shape=(3,))
    assert infer_task(values) == "regression"
    assert build_task(LossSpec(), values).loss.__class__.__name__ == "MeanSquaredError"
    with pytest.raises(UserError, match="loss 'cross_entropy' is made for classification, sequence tasks"):
        build_task(LossSpec(name="cross_entropy"), values)


@pytest.mark.parametrize("ignored", [False, True])
def test_sequence_diversity_is_per_sequence_and_exact_with_micro_batches(ignored):
    """Batches of 8 sequences in micro-batches of 3: the exact estimator's diversity over the epoch
    equals the one from explicit per-sequence gradients of the summed token loss."""
    data = token_data(ignored=ignored)
    parts = lm_parts(data, batch_size=8)  # lr 0: every step sees the same weights, as the oracle does
    assert parts.task.count_on_device is ignored  # ignored tokens are counted on the device, never synced
    estimator = ExactEstimator()
    estimator.attach(parts.model)
    trained = train_one_epoch(parts, 3, estimator, lambda: None)
    estimate = estimator.estimate(parts.model, parts.loss_fn, data.train)
    estimator.detach()
    x, y = data.train
    assert estimate.samples == 24  # a sample is a sequence
    assert estimate.value == pytest.approx(oracle_diversity(parts.model, parts.loss_fn, x, y), rel=1e-4)
    counted = (y != -100).sum().item()
    with torch.no_grad():
        mean_token_loss = F.cross_entropy(parts.model(x).flatten(0, 1), y.flatten(), reduction="sum") / counted
    assert trained.loss == pytest.approx(mean_token_loss.item(), rel=1e-5)  # the loss is per counted token


def test_the_step_is_the_mean_token_loss_of_the_logical_batch_whatever_the_micro_batches():
    data = token_data(n=8, ignored=True)
    grads = []
    for micro in (None, 3):
        parts = lm_parts(data, batch_size=8)
        captured: dict[str, torch.Tensor] = {}

        def capture(captured=captured, model=parts.model) -> None:  # in place of the optimizer's step
            captured.update({n: p.grad.clone() for n, p in model.named_parameters()})

        parts.optimizer.step = capture
        train_one_epoch(parts, micro, None, lambda: None)
        grads.append(captured)
    x, y = data.train
    reference = lm_parts(data, batch_size=8).model
    loss = F.cross_entropy(reference(x).flatten(0, 1), y.flatten())  # torch's mean over non-ignored tokens
    loss.backward()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(grads[0][name], param.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads[1][name], param.grad, rtol=1e-5, atol=1e-7)


def test_token_accuracy_and_perplexity_are_logged_per_counted_token():
    data = token_data(ignored=True)
    parts = lm_parts(data, batch_size=8)
    loss, accuracy, nll = evaluate(parts)
    x, y = data.test
    with torch.no_grad():
        logits = parts.model(x)
    keep = y != -100
    assert accuracy == pytest.approx(((logits.argmax(-1) == y) & keep).sum().item() / keep.sum().item())
    assert nll == pytest.approx(loss)  # plain cross-entropy: its mean is the log-perplexity
    metrics = parts.task.metrics("test", loss, accuracy, nll)
    assert metrics["test_perplexity"] == pytest.approx(math.exp(loss))
    assert set(metrics) == {"test_loss", "test_accuracy", "test_perplexity"}
    assert perplexity(1e4) == math.inf


def test_label_smoothing_changes_the_loss_but_perplexity_stays_the_cross_entropys():
    data = token_data()
    smooth = lm_parts(data, batch_size=8, loss=LossSpec(name="cross_entropy", params={"label_smoothing": 0.2}))
    plain = lm_parts(data, batch_size=8)
    s_loss, _, s_nll = evaluate(smooth)
    p_loss, _, p_nll = evaluate(plain)
    assert s_loss != pytest.approx(p_loss) and s_nll == pytest.approx(p_nll)  # same weights: same perplexity
    assert "train_perplexity" not in smooth.task.metrics("train", s_loss, 0.5)  # not the smoothed loss's exp


LOSS_SPEC = """\
name: loss-check
data: {{name: digits}}
model: {{name: mlp}}
optimizer: {{name: adamw, lr: 1e-3}}
loss: {loss}
epochs: 1
policy: {{name: fixed}}
"""


@pytest.mark.parametrize("command, loss, fragment", [
    ("validate", "{name: cross_entropy, params: {label_smothing: 0.1}}",
     "spec.yaml:5: loss.params.label_smothing: unknown parameter 'label_smothing' for loss 'cross_entropy'. "
     "Did you mean 'label_smoothing'?"),
    ("validate", "{name: huber, params: {delta: big}}", "spec.yaml:5: loss.params.delta:"),
    ("validate", "{params: {delta: 2.0}}", "params need a loss name"),
    ("run", "{name: huber}", "loss 'huber' is made for regression tasks, but scikit-learn digits (8x8) is a "
                             "classification task"),
])
def test_a_wrong_loss_exits_2_with_where_and_how_to_fix_it_and_creates_nothing(tmp_path, monkeypatch, command, loss,
                                                                               fragment):
    from click.testing import CliRunner

    from dbx.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "spec.yaml").write_text(LOSS_SPEC.format(loss=loss))
    result = CliRunner().invoke(main, [command, "spec.yaml"])
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert not (tmp_path / "mlflow.db").exists()

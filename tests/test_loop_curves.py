"""dbx's training loop gives the curves a bare hand-written loop gives: same data order, same
updates, same train and test numbers, whatever it does to stay cheap per step (numbers kept on
the device, predictions counted once an epoch, batches gathered a block at a time)."""
import pytest
import torch
import torch.nn.functional as F

from dbx.spec import spec_from_dict
from dbx.train.loop import fit
from dbx.train.parts import build_parts

EPOCHS = 3


class Recorder:
    def __init__(self):
        self.epochs = []

    def log_epoch(self, epoch, metrics):
        self.epochs.append(metrics)


def spec_for(model, batch_size, **extra):
    return spec_from_dict({
        "name": "curves", "seed": 3, "device": "cpu",
        "data": {"name": "synthetic_logistic", "params": {"n": 700, "d": 12}},  # 560 training samples
        "model": model, "optimizer": {"name": "sgd", "lr": 0.2, "params": {"momentum": 0.9}},
        "epochs": EPOCHS, "eval_batch_size": 64,
        "policy": {"name": "fixed", "params": {"batch_size": batch_size}},
        "checkpoint": {"enabled": False}, "tracking": {"system_metrics": False}, **extra,
    })


def bare_loop(spec, batch_size):
    """What a user would write: the loader's documented order (a permutation per epoch from a CPU
    generator seeded with the run seed), mean cross-entropy, backward, step."""
    parts = build_parts(spec, torch.device("cpu"))  # the same initial weights and data as dbx's run
    model = parts.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    x, y = parts.data.train
    test_x, test_y = parts.data.test
    generator = torch.Generator().manual_seed(spec.seed)
    curves = []
    for _ in range(EPOCHS):
        model.train()
        loss_sum = correct = 0.0
        for index in torch.randperm(len(x), generator=generator).split(batch_size):
            out = model(x[index])
            loss = F.cross_entropy(out, y[index])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss_sum += loss.item() * len(index)
            correct += (out.argmax(1) == y[index]).sum().item()
        model.eval()
        with torch.no_grad():
            out = model(test_x)
        curves.append({"train_loss": loss_sum / len(x), "train_accuracy": correct / len(x),
                       "test_loss": F.cross_entropy(out, test_y).item(),
                       "test_accuracy": (out.argmax(1) == test_y).float().mean().item()})
    return curves, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("model", [{"name": "logreg"}, {"name": "mlp", "params": {"widths": [16]}}],
                         ids=["logreg", "mlp"])
@pytest.mark.parametrize("batch_size,micro", [(32, None), (48, 16), (560, None)],
                         ids=["B32", "B48-micro16", "full-batch"])
def test_dbx_curves_equal_a_bare_loops(model, batch_size, micro):
    spec = spec_for(model, batch_size, max_micro_batch=micro)
    expected, weights = bare_loop(spec, batch_size)
    parts = build_parts(spec, torch.device("cpu"))
    recorder = Recorder()
    fit(spec, parts, recorder, say=lambda line: None)
    assert len(recorder.epochs) == EPOCHS
    for epoch, (got, want) in enumerate(zip(recorder.epochs, expected), start=1):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"epoch {epoch} {key}"
    for got, want in zip(parts.model.parameters(), weights):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert recorder.epochs[-1]["samples_seen"] == EPOCHS * 560


def test_the_first_non_finite_step_is_named_in_the_failure():
    """The step index comes from the epoch's losses, read once at its end."""
    from dbx.errors import RunFailed

    spec = spec_for({"name": "logreg"}, 40)
    parts = build_parts(spec, torch.device("cpu"))
    order = torch.randperm(parts.train_loader.num_samples, generator=torch.Generator().manual_seed(spec.seed))
    parts.train_loader.inputs[order[5 * 40 + 3]] = float("nan")  # in the sixth batch (step 5) of epoch 1
    with pytest.raises(RunFailed) as failed:
        fit(spec, parts, Recorder(), say=lambda line: None)
    assert failed.value.step == 5 and failed.value.epoch == 1

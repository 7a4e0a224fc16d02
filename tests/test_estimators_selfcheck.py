"""The self-check stops exact and per_sample_sq_norms where the hooks would measure a model wrongly:
the three silent cases (MultiheadAttention's out_proj, a weight used beside its module, a time-major
input whose T equals B), a parameter read outside its module in a model dbx has never seen, and
``dbx run`` exits 2 with the message."""
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from dbx import registry
from dbx.errors import UserError
from dbx.estimators import ExactEstimator, per_sample_sq_norms


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class BesideItsModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)) + F.linear(x, self.fc.weight))


class TimeMajor(nn.Module):
    """Reads (B, T, F) but runs its Linear on (T, B, F): right only if the Linear knew the batch is dim 1."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return torch.tanh(self.fc(x.transpose(0, 1))).sum(0)


class NeverSeen(nn.Module):
    """A gate that reads the norm layer's weight outside the norm layer's forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.norm(self.conv(x)) * torch.sigmoid(self.norm.weight).view(1, -1, 1)
        return self.head(h.mean(-1))


def one_step(model, x, y):
    estimator = ExactEstimator()
    estimator.attach(model)
    try:
        F.cross_entropy(model(x), y, reduction="sum").backward()
        estimator.on_backward(1.0)
        estimator.on_step(1.0)
    finally:
        estimator.detach()


def test_out_proj_alone_is_refused_with_a_pointer_to_its_multihead_attention():
    torch.manual_seed(0)
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    with pytest.raises(UserError, match=r"'enc\.self_attn\.out_proj' \(NonDynamicallyQuantizableLinear\) was never "
                                        r"called.*MultiheadAttention.*layers: \['enc\.self_attn'\]"):
        per_sample_sq_norms(Encoder(), F.cross_entropy, x, y, layers=["*.out_proj"])
    measured = per_sample_sq_norms(Encoder(), F.cross_entropy, x, y, layers=["*.self_attn"])  # as one module
    assert list(measured.per_layer) == ["enc.self_attn"] and (measured.total > 0).all()


def test_a_weight_used_beside_its_module_is_caught_with_the_relative_difference():
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    pattern = r"'fc\.weight' of module 'fc' \(Linear\).*differs from autograd's gradient by [0-9.e-]+ \(relative\)"
    with pytest.raises(UserError, match=pattern + r".*used outside its module's forward.*exclude: \['fc'\]"):
        per_sample_sq_norms(BesideItsModule(), F.cross_entropy, x, y)
    with pytest.raises(UserError, match=pattern):
        one_step(BesideItsModule(), x, y)


def test_a_time_major_input_whose_length_equals_the_batch_is_caught():
    torch.manual_seed(0)
    x, y = torch.randn(5, 5, 3), torch.randint(0, 3, (5,))  # T == B == 5
    pattern = r"module 'fc' \(Linear\) receives an input of shape \(5, 5, 3\) whose dimension 0 does not follow"
    with pytest.raises(UserError, match=pattern + r".*time-major"):
        per_sample_sq_norms(TimeMajor(), F.cross_entropy, x, y)
    with pytest.raises(UserError, match=pattern):
        one_step(TimeMajor(), x, y)


def test_a_parameter_read_outside_its_module_in_a_model_never_seen_is_caught():
    torch.manual_seed(0)
    x, y = torch.randn(6, 2, 7), torch.randint(0, 3, (6,))
    with pytest.raises(UserError, match=r"'norm\.weight' of module 'norm' \(GroupNorm\).*differs"):
        one_step(NeverSeen(), x, y)
    ok = per_sample_sq_norms(NeverSeen(), F.cross_entropy, x, y, exclude=["norm"])  # the way out it names
    assert "norm" not in ok.per_layer


def test_a_sound_model_passes_and_training_is_unchanged_by_the_check():
    torch.manual_seed(0)
    model = Encoder()
    reference = Encoder()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    one_step(model, x, y)  # the check's extra passes leave parameters, buffers and modes as they were
    assert model.training
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def beside_factory(*, num_classes, input_shape):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.flat = nn.Flatten()
            self.fc = nn.Linear(64, 64)
            self.out = nn.Linear(64, num_classes)

        def forward(self, x):
            x = self.flat(x)
            return self.out(torch.tanh(self.fc(x)) + F.linear(x, self.fc.weight))

    return Model()


SPEC = """\
name: selfcheck
device: cpu
data: {name: digits, subset: 64}
model: {name: logreg}
optimizer: {name: sgd, params: {lr: 0.1}}
epochs: 1
policy: {name: divebatch, params: {initial: 16, max: 64, resize_every: 1}}
estimator: {name: exact}
tracking: {system_metrics: false}
"""


def test_dbx_run_exits_2_with_the_self_checks_message(tmp_path, monkeypatch):
    import dbx.models.linear

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(dbx.models.linear, "logreg", beside_factory)
    registry.load.cache_clear()
    try:
        path = tmp_path / "spec.yaml"
        path.write_text(SPEC)
        result = CliRunner().invoke(main_cli(), ["run", str(path)])
    finally:
        registry.load.cache_clear()
    assert result.exit_code == 2, result.output
    assert "self-check" in result.output and "'fc.weight'" in result.output


def main_cli():
    from dbx.cli import main

    return main


def test_the_fused_weight_gradient_path_is_checked_against_the_unfused_gram_form(monkeypatch):
    from dbx.estimators import kernels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 3))
    assert kernels._conv_plan(model[0], torch.randn(1, 3, 8, 8), "auto", fused=True) == "explicit"
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    one_step(model, x, y)  # a sound fused step passes
    explicit = kernels._conv_explicit
    monkeypatch.setattr(kernels, "_conv_explicit", lambda *a, **k: explicit(*a, **k) * 1.05)  # a 5% error
    with pytest.raises(UserError, match=r"module '0' \(Conv2d\) from the fused weight-gradient path differ"):
        one_step(model, x, y)


def test_an_input_changed_in_place_after_the_call_is_an_error_not_a_wrong_number():
    class Gain(nn.Module):  # a user layer (the generic fallback) that saves a copy of its input
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x.float() * self.gain

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = Gain()
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = x.double() * 2
            y = self.gain(h)
            h.mul_(0.5)  # allowed by autograd (nothing saved h itself); what the fallback reads changes
            return self.head(y + h.float())

    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(UserError, match=r"input of module 'gain' \(Gain\) was modified in place"):
        per_sample_sq_norms(InPlace(), F.cross_entropy, x, y)


def test_the_cuda_paths_grouped_layers_are_checked_too(monkeypatch):
    from dbx.estimators import grouped

    def grouped_step(model, x, y):
        estimator = ExactEstimator(kernel_path="cuda")  # layers of one shape computed together, here on the CPU
        estimator.attach(model)
        try:
            F.cross_entropy(model(x), y, reduction="sum").backward()
            estimator.on_backward(1.0)
            estimator.on_step(1.0)
        finally:
            estimator.detach()

    torch.manual_seed(0)
    convs = [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1, bias=False) for i in range(3)]
    model = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2], nn.Flatten(), nn.Linear(8 * 64, 3))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    grouped_step(model, x, y)  # sound
    norms = grouped.grouped_sq_norms
    monkeypatch.setattr(grouped, "grouped_sq_norms", lambda *a, **k: norms(*a, **k) * 1.05)  # a 5% error
    with pytest.raises(UserError, match=r"module '0' \(Conv2d\) from the fused weight-gradient path differ"):
        grouped_step(model, x, y)


class CalledTwice(nn.Module):
    """One attention or recurrent module applied twice in a forward (weights shared across depth)."""

    def __init__(self, block):
        super().__init__()
        self.block, self.head = block, nn.Linear(8, 3)

    def forward(self, x):
        for _ in range(2):
            x = self.block(x, x, x)[0] if isinstance(self.block, nn.MultiheadAttention) else self.block(x)[0]
        return self.head(x.mean(1))


@pytest.mark.parametrize("block", [nn.MultiheadAttention(8, 2, batch_first=True), nn.LSTM(8, 8, batch_first=True)],
                         ids=["attention", "lstm"])
def test_an_attention_or_recurrent_module_called_twice_is_sent_to_the_fallback_by_name(block):
    torch.manual_seed(0)
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    with pytest.raises(UserError, match=r"'block' is called more than once in one forward.*fallback_force: \['block'\]"):
        one_step(CalledTwice(block), x, y)
    model = CalledTwice(block)
    forced = per_sample_sq_norms(model, F.cross_entropy, x, y, fallback_force=["block"])  # the way out
    reference = per_sample_sq_norms(model, F.cross_entropy, x, y, method="func")
    torch.testing.assert_close(forced.total, reference.total, rtol=1e-4, atol=1e-7)

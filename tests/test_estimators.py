"""The diversity estimators, driven exactly as dbx's training loop drives them.

For a measuring epoch the loop calls ``attach(model)``; per logical batch of B samples split into
micro-batches: forward, ``loss = loss_fn(out, y, reduction="sum") * loss_scale``, backward,
``on_backward(loss_scale)``; then ``on_step(loss_scale)``, the optimizer step and
``zero_grad(set_to_none=True)``; at the end ``estimate(model, loss_fn, data)`` and ``detach()``.
The oracle is explicit per-sample gradients from ``torch.func`` (vmap over grad) at the weights of
each step.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dbx import registry
from dbx.errors import UserError
from dbx.estimators import (
    ExactEstimator,
    LayerwiseEstimator,
    SubsampledEstimator,
    per_sample_grads_func,
    per_sample_sq_norms,
)
from dbx.protocols import DiversityEstimate, DiversityEstimator


def mlp(d_in: int = 12, width: int = 16, classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Dropout(0.0), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, classes))


def classification_data(n: int = 50, d_in: int = 12, classes: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)


def train_epoch(estimator, model, inputs, targets, *, batch_size, micro_batch, loss_fn=F.cross_entropy,
                reduction="mean", oracle=True, lr=0.1, params=None):
    """One measuring epoch the way dbx's loop runs it; returns the estimate and the oracle's value.

    ``params`` restricts the oracle to these parameter names (what the estimator measures).
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    estimator.attach(model)
    sum_sq, grad_sum = 0.0, None
    for s in range(0, len(inputs), batch_size):
        x, y = inputs[s:s + batch_size], targets[s:s + batch_size]
        if oracle:  # per-sample gradients at the weights of this step
            g = per_sample_grads_func(model, loss_fn, x, y, params)
            flat = torch.cat([v.flatten(1) for v in g.values()], 1).double()
            sum_sq += flat.square().sum().item()
            grad_sum = flat.sum(0) if grad_sum is None else grad_sum + flat.sum(0)
        loss_scale = 1.0 / len(x) if reduction == "mean" else 1.0
        for m in range(0, len(x), micro_batch):
            out = model(x[m:m + micro_batch])
            loss = loss_fn(out, y[m:m + micro_batch], reduction="sum") * loss_scale
            loss.backward()
            estimator.on_backward(loss_scale)
        estimator.on_step(loss_scale)
        opt.step()
        opt.zero_grad(set_to_none=True)
    est = estimator.estimate(model, loss_fn, (inputs, targets))
    estimator.detach()
    expected = sum_sq / grad_sum.square().sum().item() if oracle else None
    return est, expected


# -- part 1: the exact estimator on Linear models ----------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch_size,micro_batch", [(16, 16), (16, 5), (20, 7)])
def test_exact_equals_explicit_per_sample_gradients_on_an_mlp(reduction, batch_size, micro_batch):
    model = mlp()
    inputs, targets = classification_data(n=50)  # 50 = 3 full batches of 16 and a partial one
    lr = 0.1 if reduction == "mean" else 0.005
    est, expected = train_epoch(ExactEstimator(), model, inputs, targets, batch_size=batch_size,
                                micro_batch=micro_batch, reduction=reduction, lr=lr)
    assert isinstance(est, DiversityEstimate)
    assert est.samples == 50
    assert est.value == pytest.approx(expected, rel=1e-5)
    assert est.value == pytest.approx(est.sum_sq_norms / est.sq_norm_of_sum, rel=1e-12)
    assert est.seconds > 0


def test_a_step_whose_gradients_overflowed_is_left_out_of_both_sums():
    # fp16 training passes the GradScaler's scale as a device tensor; a step whose scaled
    # gradients overflowed (the scaler skips it) must not reach the statistic
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))

    def step(estimator, scale):
        loss_scale = torch.tensor(scale) / len(x)
        (F.cross_entropy(model(x), y, reduction="sum") * loss_scale).backward()
        estimator.on_backward(loss_scale)
        estimator.on_step(loss_scale)
        model.zero_grad(set_to_none=True)

    with_overflow, clean = ExactEstimator(), ExactEstimator()
    with_overflow.attach(model)
    step(with_overflow, 1e38)  # squares of these gradients overflow float32
    step(with_overflow, 1024.0)
    result = with_overflow.estimate(model, F.cross_entropy, None)
    with_overflow.detach()
    clean.attach(model)
    step(clean, 1.0)
    expected = clean.estimate(model, F.cross_entropy, None)
    clean.detach()
    assert result.samples == expected.samples == 8
    assert result.value == pytest.approx(expected.value, rel=1e-5)
    assert result.sum_sq_norms == pytest.approx(expected.sum_sq_norms, rel=1e-5)


def test_exact_on_regression_with_mse_and_a_bias_free_layer():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.GELU(), nn.Linear(8, 1))
    x = torch.randn(33, 6)
    y = torch.randn(33, 1)
    est, expected = train_epoch(ExactEstimator(), model, x, y, batch_size=10, micro_batch=4, loss_fn=F.mse_loss)
    assert est.value == pytest.approx(expected, rel=1e-5)


def test_exact_on_sequences_of_features_both_forms():
    # Linear over (B, T, in): the Gram ("ghost") form for the wide layer, the explicit product for the narrow one.
    from dbx.estimators.kernels import outer_forms_used

    class SeqModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide = nn.Linear(32, 48)   # T=5: 5*(32+48) < 32*48 -> ghost
            self.narrow = nn.Linear(48, 2)  # 5*(48+2) > 48*2 -> explicit
            self.head = nn.Linear(2, 3)

        def forward(self, x):
            h = self.narrow(torch.tanh(self.wide(x)))
            return self.head(h.mean(1))

    assert outer_forms_used(5, 32, 48) == "ghost" and outer_forms_used(5, 48, 2) == "explicit"
    torch.manual_seed(0)
    model = SeqModel()
    x = torch.randn(21, 5, 32)
    y = torch.randint(0, 3, (21,))
    est, expected = train_epoch(ExactEstimator(), model, x, y, batch_size=8, micro_batch=3)
    assert est.value == pytest.approx(expected, rel=1e-5)


def test_exact_reports_per_layer_diversity_on_request():
    model = mlp()
    x, y = classification_data(n=24)
    est, _ = train_epoch(ExactEstimator(per_layer=True), model, x, y, batch_size=24, micro_batch=24, oracle=False)
    assert sorted(est.per_layer) == ["0", "3", "5"]
    assert all(v > 0 for v in est.per_layer.values())
    est, _ = train_epoch(ExactEstimator(), mlp(), x, y, batch_size=24, micro_batch=24, oracle=False)
    assert est.per_layer == {}


def test_unsupported_module_is_a_clear_error_at_attach():
    model = nn.Sequential(nn.Linear(4, 8), nn.PReLU(), nn.Linear(8, 2))
    with pytest.raises(UserError) as info:  # without the generic fallback, a module with no kernel is refused
        ExactEstimator(fallback_forbid=["*"]).attach(model)
    message = str(info.value)
    assert "'1'" in message and "PReLU" in message  # the module path and type
    assert "exclude" in message and "subsampled" in message  # how to get going


def test_unsupported_module_can_be_excluded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.PReLU(), nn.Linear(8, 2))
    x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    est, expected = train_epoch(ExactEstimator(exclude=["1"]), model, x, y, batch_size=10, micro_batch=5,
                                params=["0.weight", "0.bias", "2.weight", "2.bias"])
    assert est.value == pytest.approx(expected, rel=1e-5)


def test_unsupported_modules_nested_deeper_are_named_by_path():
    model = nn.Sequential(nn.Linear(4, 4))
    model.add_module("rnn", nn.Sequential(nn.GRU(4, 4)))
    with pytest.raises(UserError, match=r"'rnn\.0' \(torch\.nn\.modules\.rnn\.GRU\)"):
        ExactEstimator(fallback=False).attach(model)


def test_hooks_do_nothing_under_no_grad_and_do_not_disturb_training():
    model = mlp()
    x, y = classification_data(n=32)
    estimator = ExactEstimator()
    estimator.attach(model)
    with torch.no_grad():  # evaluation inside a measuring epoch
        model(x)
    hooks = estimator._hooks
    assert hooks._touched == [] and all(layer.calls == 0 for layer in hooks.layers)
    assert hooks.batch is None
    estimator.detach()
    est, expected = train_epoch(estimator, model, x, y, batch_size=8, micro_batch=8)
    assert est.value == pytest.approx(expected, rel=1e-5)


def test_evaluation_between_steps_does_not_change_the_estimate():
    x, y = classification_data(n=32)
    values = []
    for evaluate in (False, True):
        model = mlp(seed=5)
        estimator = ExactEstimator()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        estimator.attach(model)
        for s in range(0, 32, 8):
            loss = F.cross_entropy(model(x[s:s + 8]), y[s:s + 8], reduction="sum") / 8
            loss.backward()
            estimator.on_backward(1 / 8)
            if evaluate:
                with torch.no_grad():
                    model.eval()
                    model(x)
                    model.train()
            estimator.on_step(1 / 8)
            opt.step()
            opt.zero_grad(set_to_none=True)
        values.append(estimator.estimate(model, F.cross_entropy, (x, y)).value)
        estimator.detach()
    assert values[0] == values[1]


def test_detach_removes_every_hook():
    model = mlp()
    before = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}
    estimator = ExactEstimator()
    estimator.attach(model)
    assert any(len(m._forward_hooks) for m in model.modules())
    estimator.detach()
    after = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}
    assert after == before
    out = model(torch.randn(3, 12))  # and a forward with grad afterwards registers nothing
    assert out.grad_fn is not None and not out._backward_hooks


def test_attach_twice_and_reuse_across_epochs():
    model = mlp()
    x, y = classification_data(n=30)
    estimator = ExactEstimator()
    first, expected1 = train_epoch(estimator, model, x, y, batch_size=10, micro_batch=10)
    second, expected2 = train_epoch(estimator, model, x, y, batch_size=10, micro_batch=3)
    assert first.value == pytest.approx(expected1, rel=1e-5)
    assert second.value == pytest.approx(expected2, rel=1e-5)
    assert second.samples == 30  # nothing carried over from the first epoch


def test_estimate_without_steps_is_nan_not_a_crash():
    estimator = ExactEstimator()
    model = mlp()
    estimator.attach(model)
    est = estimator.estimate(model, F.cross_entropy, classification_data())
    estimator.detach()
    assert math.isnan(est.value) and est.samples == 0


def test_importing_dbx_estimators_does_not_import_torch():
    code = "import sys, dbx.estimators; assert 'torch' not in sys.modules; print(dbx.estimators.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# -- contract: every registered estimator ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(registry.available("estimator")))
def test_every_registered_estimator_follows_the_contract(name):
    factory = registry.load("estimator", name)
    estimator = registry.build("estimator", name, {}, seed=0)
    assert isinstance(estimator, DiversityEstimator)
    schema, _ = registry.params_of("estimator", factory)
    assert all(not p.required for p in schema.values())  # usable without params
    model = mlp()
    x, y = classification_data(n=40)
    est, expected = train_epoch(estimator, model, x, y, batch_size=10, micro_batch=5)
    assert isinstance(est, DiversityEstimate)
    assert est.samples > 0 and math.isfinite(est.value) and est.value > 0
    assert est.seconds >= 0
    assert not any(len(m._forward_hooks) for m in model.modules())  # detach cleaned up


def test_registry_validates_estimator_params():
    assert registry.check_params("estimator", "exact", {"exclude": ["fc", "*.bn*"]}) == []
    problems = registry.check_params("estimator", "exact", {"exclud": ["fc"]})
    assert problems and "Did you mean 'exclude'" in problems[0][1]
    problems = registry.check_params("estimator", "subsampled", {"samples": "many", "method": "magic"})
    assert {p[0] for p in problems} == {("samples",), ("method",)}
    assert registry.check_params("estimator", "layerwise", {"layers": ["linear", "layer4"]}) == []


# -- per_sample_sq_norms ----------------------------------------------------------------------------


def test_per_sample_sq_norms_matches_torch_func_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5))
    model.eval()
    x, y = torch.randn(7, 3, 6, 6), torch.randint(0, 5, (7,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast = per_sample_sq_norms(model, F.cross_entropy, x, y)
    slow = per_sample_sq_norms(model, F.cross_entropy, x, y, method="func")
    assert fast.total.shape == (7,)
    torch.testing.assert_close(fast.total, slow.total, rtol=1e-4, atol=1e-6)
    assert sorted(fast.per_layer) == ["0", "1", "4"]
    torch.testing.assert_close(torch.stack(list(fast.per_layer.values())).sum(0), fast.total)
    assert fast.diversity() == pytest.approx(slow.diversity(), rel=1e-4)
    assert all(p.grad is None for p in model.parameters())
    model.train()  # in training mode BatchNorm's running statistics are restored afterwards
    per_sample_sq_norms(model, F.cross_entropy, x, y)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_per_sample_sq_norms_auto_falls_back_to_torch_func():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.PReLU(), nn.Linear(6, 3))
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    with pytest.raises(UserError):  # hooks only, without the per-module fallback: PReLU has no kernel
        per_sample_sq_norms(model, F.cross_entropy, x, y, fallback_forbid=["1"])
    hooks = per_sample_sq_norms(model, F.cross_entropy, x, y)  # PReLU through the per-module fallback
    auto = per_sample_sq_norms(model, F.cross_entropy, x, y, method="auto", fallback_forbid=["1"])
    slow = per_sample_sq_norms(model, F.cross_entropy, x, y, method="func")
    torch.testing.assert_close(auto.total, slow.total, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hooks.total, slow.total, rtol=1e-5, atol=1e-7)
    assert set(auto.per_layer) == {"0", "1", "2"} == set(hooks.per_layer)


# -- layerwise ------------------------------------------------------------------------------------------


def test_layerwise_per_layer_values_match_the_oracle_per_layer():
    x, y = classification_data(n=36)
    est, _ = train_epoch(LayerwiseEstimator(), mlp(seed=2), x, y, batch_size=12, micro_batch=5, oracle=False)
    for path, names in {"0": ["0.weight", "0.bias"], "5": ["5.weight", "5.bias"]}.items():
        # the same training run, with the oracle restricted to that layer's parameters
        _, expected = train_epoch(LayerwiseEstimator(layers=[path]), mlp(seed=2), x, y, batch_size=12,
                                  micro_batch=5, params=names)
        assert est.per_layer[path] == pytest.approx(expected, rel=1e-5)
    full, expected = train_epoch(LayerwiseEstimator(), mlp(seed=2), x, y, batch_size=12, micro_batch=5)
    assert full.value == pytest.approx(expected, rel=1e-5)


def test_layerwise_restricted_to_the_classifier_ignores_unsupported_modules_elsewhere():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.PReLU(), nn.Linear(8, 3))
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    est, expected = train_epoch(LayerwiseEstimator(layers=["2"]), model, x, y, batch_size=8, micro_batch=8,
                                params=["2.weight", "2.bias"])
    assert list(est.per_layer) == ["2"]
    assert est.value == pytest.approx(expected, rel=1e-5)
    assert est.per_layer["2"] == pytest.approx(est.value)


def test_layerwise_with_patterns_that_match_nothing_lists_the_layers():
    with pytest.raises(UserError, match="Parameter-owning modules of this model: 0, 3, 5"):
        LayerwiseEstimator(layers=["classifier"]).attach(mlp())


# -- subsampled -------------------------------------------------------------------------------------------


def test_subsampled_equals_the_diversity_of_its_drawn_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.PReLU(), nn.Linear(10, 4))  # PReLU: torch.func fallback
    x, y = classification_data(n=60)
    estimator = SubsampledEstimator(samples=25, micro_batch=10, extrapolate=False, seed=7)
    est = estimator.estimate(model, F.cross_entropy, (x, y))
    index = torch.randperm(60, generator=torch.Generator().manual_seed(7 * 1_000_003))[:25]
    g = per_sample_grads_func(model, F.cross_entropy, x[index], y[index])
    flat = torch.cat([v.flatten(1) for v in g.values()], 1).double()
    expected = flat.square().sum() / flat.sum(0).square().sum()
    assert est.samples == 25
    assert est.value == pytest.approx(expected.item(), rel=1e-5)
    assert all(p.grad is None for p in model.parameters())
    # extrapolated, the value and its sums describe all 60 samples, and so does `samples`
    assert SubsampledEstimator(samples=25, micro_batch=10, seed=7).estimate(model, F.cross_entropy, (x, y)).samples == 60


def test_subsampled_extrapolates_to_the_training_set_exactly_when_it_sees_all_of_it():
    from dbx.estimators.subsampled import extrapolate_to_population

    model = mlp()
    x, y = classification_data(n=40)
    everything = SubsampledEstimator(samples=40, micro_batch=16).estimate(model, F.cross_entropy, (x, y))
    exact = per_sample_sq_norms(model.eval(), F.cross_entropy, x, y)
    assert everything.value == pytest.approx(exact.diversity(), rel=1e-5)
    # and the estimator is unbiased for the two sums: with m = n it is the identity
    assert extrapolate_to_population(3.0, 5.0, 10, 10) == (3.0, 5.0)
    s1, q = extrapolate_to_population(3.0, 5.0, 10, 100)
    assert s1 == pytest.approx(30.0) and q == pytest.approx(30.0 + 2.0 * 100 * 99 / 90)


def test_subsampled_is_seeded_draws_anew_each_epoch_and_reads_datasets():
    model = mlp()
    x, y = classification_data(n=80)
    dataset = torch.utils.data.TensorDataset(x, y)
    a = SubsampledEstimator(samples=16, seed=1)
    b = SubsampledEstimator(samples=16, seed=1)
    first_a, first_b = a.estimate(model, F.cross_entropy, (x, y)), b.estimate(model, F.cross_entropy, dataset)
    assert first_a.value == pytest.approx(first_b.value, rel=1e-6)
    assert a.estimate(model, F.cross_entropy, (x, y)).value != first_a.value
    c = SubsampledEstimator(samples=16, seed=1)
    c.load_state_dict(a.state_dict())
    assert c._draws == 2


def test_subsampled_rejects_bad_params():
    with pytest.raises(ValueError, match="samples"):
        SubsampledEstimator(samples=1)
    with pytest.raises(registry.PluginError):
        registry.build("estimator", "subsampled", {"micro_batch": 0}, seed=0)

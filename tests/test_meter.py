"""dbx.DiversityMeter in hand-written loops: right numbers against torch.func, and every misuse an error."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dbx
from dbx.meter import DiversityMeter, MeterError


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def data(n: int = 48, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def oracle_step(model, x, y, sums):
    """Per-sample gradients at the current weights from torch.func (the reference), added to sums."""
    ref = dbx.per_sample_sq_norms(model, F.cross_entropy, x, y, method="func")
    sums["s1"] += float(ref.total.double().sum())
    for name, g in ref.grad_sum.items():
        sums["s2"][name] = sums["s2"].get(name, 0) + g.double()


def oracle_diversity(sums) -> float:
    return sums["s1"] / sum(float(g.square().sum()) for g in sums["s2"].values())


def test_adamw_clipping_micro_batches_match_per_sample_gradients_from_torch_func():
    model, (x, y) = mlp(), data(50)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    meter = DiversityMeter(model)
    sums = {"s1": 0.0, "s2": {}}
    with meter.epoch():
        for start in range(0, 50, 16):  # logical batches 16, 16, 16, 2
            xb, yb = x[start:start + 16], y[start:start + 16]
            oracle_step(model, xb, yb, sums)
            for xm, ym in zip(xb.split(5), yb.split(5)):  # unequal micro-batches: weight each by its share
                (F.cross_entropy(model(xm), ym) * len(xm) / len(xb)).backward()
            meter.step()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)  # clips every step here
            optimizer.step()
            optimizer.zero_grad()
    assert meter.samples == 50
    assert meter.diversity == pytest.approx(oracle_diversity(sums), rel=1e-5)
    assert meter.sum_sq_norms == pytest.approx(sums["s1"], rel=1e-5)
    assert set(meter.per_layer) == {"0", "2"}
    assert isinstance(meter.result, dbx.DiversityEstimate)


def test_bf16_autocast_norms_stay_within_bf16_error_of_the_float32_reference():
    model, (x, y) = mlp(), data(32)
    meter = DiversityMeter(model)
    with meter.epoch():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        meter.step()
    reference = dbx.per_sample_sq_norms(model, F.cross_entropy, x, y).diversity()
    assert meter.diversity == pytest.approx(reference, rel=3e-2)


def test_the_micro_batch_split_and_the_reduction_do_not_change_the_value():
    (x, y) = data(24)
    values = []
    for chunk, reduction in ((24, "mean"), (7, "mean"), (24, "sum"), (5, "sum")):
        model = mlp()
        meter = DiversityMeter(model, reduction=reduction)
        with meter.epoch():
            for xm, ym in zip(x.split(chunk), y.split(chunk)):
                loss = F.cross_entropy(model(xm), ym, reduction="sum")
                (loss / len(x) if reduction == "mean" else loss).backward()
            meter.step()
        values.append(meter.diversity)
    assert values == pytest.approx([values[0]] * 4, rel=1e-6)


def test_a_grad_scaler_is_divided_out_and_copy_grads_allows_stepping_after_unscale_and_clipping():
    (x, y) = data(32)
    plain_model, scaled_model = mlp(), mlp()
    plain = DiversityMeter(plain_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled = DiversityMeter(scaled_model, scaler=scaler, copy_grads=True)
    optimizer = torch.optim.SGD(scaled_model.parameters(), lr=0.0)
    with plain.epoch(), scaled.epoch():
        for xb, yb in zip(x.split(8), y.split(8)):
            F.cross_entropy(plain_model(xb), yb).backward()
            plain.step()
            plain_model.zero_grad()
            scaler.scale(F.cross_entropy(scaled_model(xb), yb)).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(scaled_model.parameters(), 1e-3)
            scaled.step()  # after unscale_ and clipping: fine with copy_grads
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    assert scaled.diversity == pytest.approx(plain.diversity, rel=1e-5)
    assert scaled.samples == plain.samples == 32


def test_an_epoch_not_measured_attaches_nothing_and_its_steps_cost_nothing():
    model, (x, y) = mlp(), data(8)
    meter = DiversityMeter(model)
    with meter.epoch(measure=False):
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        F.cross_entropy(model(x), y).backward()
        meter.step()
    assert meter.result is None
    with pytest.raises(MeterError, match="no measured epoch"):
        meter.diversity  # noqa: B018 - the property raises


def test_steps_do_not_wait_for_the_device():
    """The hot path: no .item()/.tolist() (aten::_local_scalar_dense) in backward or step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountSyncs(TorchDispatchMode):
        syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountSyncs.syncs += 1
            return func(*args, **(kwargs or {}))

    model, (x, y) = mlp(), data(16)
    meter = DiversityMeter(model)
    with meter.epoch():
        with CountSyncs():
            for xb, yb in zip(x.split(8), y.split(8)):
                F.cross_entropy(model(xb), yb).backward()
                meter.step()
                model.zero_grad()
        assert CountSyncs.syncs == 0
    assert meter.samples == 16


# -- misuse: each a clear error, never a silent 0 ----------------------------------------------------


def test_a_step_without_a_backward_is_an_error():
    model, (x, y) = mlp(), data(8)
    meter = DiversityMeter(model)
    with pytest.raises(MeterError, match="found no backward through the model since the last step"):
        with meter.epoch():
            F.cross_entropy(model(x), y).backward()
            meter.step()
            meter.step()  # twice for one backward
    assert not meter.measuring and meter.result is None


def test_a_backward_not_followed_by_step_before_the_optimizer_step_is_an_error():
    model, (x, y) = mlp(), data(16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    meter = DiversityMeter(model)
    with pytest.raises(MeterError, match="optimizer step ran after 1 backward.*never counted"):
        with meter.epoch():
            for xb, yb in zip(x.split(8), y.split(8)):
                F.cross_entropy(model(xb), yb).backward()  # no meter.step()
                optimizer.step()
                optimizer.zero_grad()


def test_a_backward_not_followed_by_step_at_the_end_of_the_epoch_is_an_error():
    model, (x, y) = mlp(), data(8)
    meter = DiversityMeter(model)
    with pytest.raises(MeterError, match="last 1 backward.*not followed by meter.step"):
        with meter.epoch():
            F.cross_entropy(model(x), y).backward()


def test_an_epoch_over_zero_samples_is_an_error():
    meter = DiversityMeter(mlp())
    with pytest.raises(MeterError, match="measured no step"):
        with meter.epoch():
            pass


def test_an_epoch_whose_every_step_overflowed_is_an_error():
    model, (x, y) = mlp(), data(8)
    meter = DiversityMeter(model)
    with pytest.raises(MeterError, match="all 1 measured steps had non-finite gradients"):
        with meter.epoch():
            (F.cross_entropy(model(x), y) * float("inf")).backward()
            meter.step()


def test_an_unsupported_layer_is_an_error_at_construction_naming_it_and_exclude_leaves_it_out():
    model = nn.Sequential(nn.Linear(6, 8), nn.PReLU(), nn.Linear(8, 4))
    with pytest.raises(MeterError, match=r"'1' \(torch.nn.modules.activation.PReLU\).*exclude"):
        DiversityMeter(model)
    meter = DiversityMeter(model, exclude=["1"])
    x, y = data(8)
    with meter.epoch():
        F.cross_entropy(model(x), y).backward()
        meter.step()
    assert meter.layers == ["0", "2"] and meter.samples == 8


def test_gradients_changed_before_step_are_an_error_that_says_how_to_fix_it():
    model, (x, y) = mlp(), data(8)
    meter = DiversityMeter(model)
    with pytest.raises(MeterError, match="gradients changed between the backward and meter.step.*copy_grads=True"):
        with meter.epoch():
            F.cross_entropy(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            meter.step()


def test_a_module_whose_weight_is_used_without_calling_it_is_an_error_at_the_first_step():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(6, 8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return F.linear(torch.tanh(self.body(x)), self.head.weight, self.head.bias)  # head never called

    model = Functional()
    meter = DiversityMeter(model)
    x, y = data(8)
    with pytest.raises(MeterError, match="'head' \\(Linear\\).*never called.*exclude=\\['head'\\]"):
        with meter.epoch():
            F.cross_entropy(model(x), y).backward()
            meter.step()


def test_a_wrong_reduction_or_a_second_start_is_an_error():
    with pytest.raises(MeterError, match="reduction='avg'.*'mean'.*'sum'"):
        DiversityMeter(mlp(), reduction="avg")
    meter = DiversityMeter(mlp())
    meter.start()
    with pytest.raises(MeterError, match="already measuring"):
        meter.start()
    meter.cancel()
    with pytest.raises(MeterError, match="stop\\(\\) without start"):
        meter.stop()


def test_importing_dbx_imports_neither_torch_nor_mlflow():
    code = "import sys, dbx; dbx.__all__; assert 'torch' not in sys.modules and 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert dbx.DiversityMeter is DiversityMeter
    assert "DiversityMeter" in dir(dbx)

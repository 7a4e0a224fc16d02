"""Optimizers by name (every torch.optim class is a ``dbx.optimizers`` plugin), their params checked
like every plugin's, today's SGD shorthand unchanged, ``lr_scaling: auto``, and gradient clipping."""
import io
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from dbx import registry
from dbx.cli import main
from dbx.spec import spec_from_dict
from dbx.train.lr import resolve_lr_scaling
from dbx.train.parts import build_optimizer

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
NOT_REGISTERED = {"LBFGS": "needs a closure that re-evaluates the loss", "SparseAdam": "sparse gradients only",
                  "Muon": "2-d parameters only: it needs parameter groups, a plugin's job"}

BASE = {"name": "opt", "data": {"name": "digits"}, "model": {"name": "mlp"}, "epochs": 1,
        "policy": {"name": "fixed"}}


def optimizer_spec(**optimizer):
    return spec_from_dict({**BASE, "optimizer": optimizer}).optimizer


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def steps(model, optimizer, count, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_every_torch_optim_class_is_registered_by_its_lower_case_name():
    classes = {name for name in dir(torch.optim) if isinstance(getattr(torch.optim, name), type)
               and issubclass(getattr(torch.optim, name), torch.optim.Optimizer) and name != "Optimizer"}
    registered = registry.available("optimizer")
    assert {name.lower() for name in classes - set(NOT_REGISTERED)} <= set(registered)
    for name, info in registered.items():
        if info.distribution == "dbx":  # torch's own classes; sgd through dbx's factory, with momentum 0.9
            assert info.target.startswith("torch.optim:") or name == "sgd", name
    assert type(registry.build("optimizer", "sgd", {}, params=tiny_model().parameters())) is torch.optim.SGD


@pytest.mark.parametrize("name", sorted(registry.available("optimizer")))
def test_every_optimizer_trains_and_resumes_exactly_from_its_state(name):
    """Three steps straight, or two, a checkpoint of the state (read back as dbx's checkpoints are,
    with weights_only), a fresh optimizer, and the third: the same weights, bit for bit."""
    spec = optimizer_spec(name=name, lr=1e-2)
    straight = tiny_model()
    steps(straight, build_optimizer(spec, straight), 3)

    resumed = tiny_model()
    optimizer = build_optimizer(spec, resumed)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        F.cross_entropy(resumed(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    model = tiny_model()
    model.load_state_dict(saved["model"])
    fresh = build_optimizer(spec, model)
    fresh.load_state_dict(saved["optimizer"])
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    F.cross_entropy(model(x), y).backward()
    fresh.step()
    for a, b in zip(straight.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(tiny_model().parameters(), model.parameters())), "it trains"


def test_the_sgd_shorthand_and_the_general_form_are_one_optimizer():
    short = optimizer_spec(lr=0.1, weight_decay=5e-4)
    general = optimizer_spec(name="sgd", params={"lr": 0.1, "weight_decay": 5e-4})
    assert short.constructor_kwargs() == general.constructor_kwargs() == {
        "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False, "lr": 0.1}  # momentum 0.9, as it always was
    built = build_optimizer(short, tiny_model())
    assert type(built) is torch.optim.SGD and built.defaults["momentum"] == 0.9
    adamw = build_optimizer(optimizer_spec(name="adamw", params={"lr": 3e-4, "betas": [0.9, 0.95]}), tiny_model())
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.9, 0.95)  # a YAML list, as a tuple


def test_lr_scaling_auto_is_linear_for_sgd_and_sqrt_for_adaptive_methods():
    params = list(tiny_model().parameters())
    assert resolve_lr_scaling("auto", torch.optim.SGD(params, lr=0.1)) == "linear"
    for adaptive in (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop):
        assert resolve_lr_scaling("auto", adaptive(params, lr=0.1)) == "sqrt"
    assert resolve_lr_scaling("none", torch.optim.AdamW(params)) == "none"  # an explicit rule stays

    class Declares(torch.optim.SGD):
        lr_scaling = "sqrt"  # a plugin may name its rule

    assert resolve_lr_scaling("auto", Declares(params, lr=0.1)) == "sqrt"


SPEC = """\
name: bad-optimizer
data: {name: digits}
model: {name: mlp}
optimizer:
  name: adamw
  params:
    lr: 3e-4
    betaz: [0.9, 0.95]
    eps: small
    amsgrad: 1
epochs: 1
policy: {name: fixed}
"""


def test_validate_reports_each_bad_optimizer_param_with_file_and_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    out = result.output
    assert f"{path}:8: optimizer.params.betaz: unknown parameter 'betaz' for optimizer 'adamw'. Did you mean 'betas'?" in out
    assert f"{path}:9: optimizer.params.eps: " in out and "adamw expects float" in out
    assert f"{path}:10: optimizer.params.amsgrad: " in out and "adamw expects bool" in out


@pytest.mark.parametrize("optimizer, where, fragment", [
    ("{name: adamww, params: {lr: 1e-3}}", 4, "unknown optimizer 'adamww'. Did you mean 'adamw'?"),
    ("{name: adamw, lr: 1e-3, momentum: 0.9}", 4, "momentum beside name is SGD shorthand"),
    ("{name: adamw, lr: 1e-3, params: {lr: 1e-3}}", 4, "lr is given twice"),
    ("{name: adamw, params: {weight_decay: 0.1}}", 4, "missing the learning rate"),
    ("{name: adamw, lr: 1e-3, betas: [0.9, 0.9]}", 4, "The optimizer's own settings go in optimizer.params"),
    ("{name: sgd, params: {lr: 0.1, momentum: fast}}", 4, "sgd expects float"),
])
def test_optimizer_mistakes_exit_2_with_the_line_and_the_fix(tmp_path, optimizer, where, fragment):
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: x\ndata: {{name: digits}}\nmodel: {{name: mlp}}\noptimizer: {optimizer}\nepochs: 1\n"
                    f"policy: {{name: fixed}}\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{path}:{where}: optimizer" in result.output and fragment in result.output


def test_a_set_override_of_an_optimizer_param_is_checked_too(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(SPEC).replace("    betaz: [0.9, 0.95]\n    eps: small\n    amsgrad: 1\n", ""))
    result = CliRunner().invoke(main, ["validate", str(path), "--set", "optimizer.params.betas=[0.9]"])
    assert result.exit_code == 2 and "--set optimizer.params.betas=[0.9]: optimizer.params.betas:" in result.output


def test_clipping_acts_after_the_estimator_has_read_the_unclipped_gradients(tmp_path):
    """One step per epoch (B = n): the diversity is the same with and without clipping, the
    weights are not, and grad_norm is the unclipped norm."""
    from dbx.train.loop import train_one_epoch
    from dbx.train.parts import build_parts

    results = []
    for clip in (None, 1e-3):
        spec = spec_from_dict({**BASE, "optimizer": {"name": "adamw", "lr": 1e-2}, "clip_grad_norm": clip,
                               "policy": {"name": "divebatch", "params": {"initial": 1438, "max": 1438}},
                               "device": "cpu"})
        parts = build_parts(spec, torch.device("cpu"))
        parts.estimator.attach(parts.model)
        trained = train_one_epoch(parts, 500, parts.estimator, lambda: None, clip=spec.clip_grad_norm)
        estimate = parts.estimator.estimate(parts.model, parts.loss_fn, parts.data.train)
        parts.estimator.detach()
        results.append((estimate.value, trained, [p.detach().clone() for p in parts.model.parameters()]))
    (free, free_epoch, free_weights), (clipped, clipped_epoch, clipped_weights) = results
    assert trained.steps == 1 and clipped == free
    assert clipped_epoch.grad_norm > 1e-3 and free_epoch.grad_norm is None
    assert any(not torch.equal(a, b) for a, b in zip(free_weights, clipped_weights))

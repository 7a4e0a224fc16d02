"""Learning-rate schedules (pure functions of the epoch) and the batch-size rescale rules."""
import math
from types import SimpleNamespace

import pytest

from dbx.train.lr import rescale_factor, scheduled_lr


def schedule(name="constant", **kw):
    base = dict(name=name, t_max=None, milestones=[], gamma=0.1, step_size=None, warmup_epochs=0, min_lr=0.0,
                pct_start=0.3, div_factor=25.0)
    return SimpleNamespace(**{**base, **kw})


def test_cosine_starts_at_the_base_lr_and_anneals_to_min_lr():
    lrs = [scheduled_lr(schedule("cosine", t_max=200), 0.1, e, 200) for e in (1, 101, 201)]
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.05) and lrs[2] == pytest.approx(0.0)


def test_multistep_like_the_cifar100_recipe():
    s = schedule("multistep", milestones=[60, 120, 160], gamma=0.2)
    assert scheduled_lr(s, 0.1, 60, 200) == pytest.approx(0.1)
    assert scheduled_lr(s, 0.1, 61, 200) == pytest.approx(0.02)
    assert scheduled_lr(s, 0.1, 200, 200) == pytest.approx(0.1 * 0.2 ** 3)


def test_step_like_the_tiny_imagenet_recipe():
    s = schedule("step", step_size=30, gamma=0.1)
    assert [scheduled_lr(s, 0.01, e, 90) for e in (30, 31, 61)] == pytest.approx([0.01, 0.001, 0.0001])


def test_warmup_scales_the_first_epochs_linearly():
    s = schedule("constant", warmup_epochs=4)
    assert [scheduled_lr(s, 0.4, e, 10) for e in (1, 2, 4, 5)] == pytest.approx([0.1, 0.2, 0.4, 0.4])


def test_rescale_rules():
    assert rescale_factor("none", 128, 1024) == 1.0
    assert rescale_factor("linear", 128, 1024) == 8.0
    assert rescale_factor("sqrt", 128, 512) == pytest.approx(2.0)
    assert rescale_factor("linear", 128, 128) == 1.0
    assert math.isclose(rescale_factor("sqrt", 100, 300), math.sqrt(3))


def test_linear_decays_in_a_straight_line_to_min_lr():
    s = schedule("linear", min_lr=0.01)  # as cosine: epoch e runs at the rate after e - 1 of t_max epochs
    assert [scheduled_lr(s, 0.11, e, 10) for e in (1, 6, 10)] == pytest.approx([0.11, 0.06, 0.02])
    assert scheduled_lr(schedule("linear", t_max=5), 0.1, 9, 10) == pytest.approx(0.0)  # stays at min_lr after t_max


def test_onecycle_rises_from_lr_over_div_factor_then_anneals_to_min_lr():
    s = schedule("onecycle", pct_start=0.3, div_factor=10.0, min_lr=0.001)
    lrs = [scheduled_lr(s, 0.1, e, 11) for e in range(1, 12)]
    assert lrs[0] == pytest.approx(0.01)  # the first epoch: lr / div_factor
    assert lrs[:4] == sorted(lrs[:4]) and max(lrs) == pytest.approx(0.1, rel=0.05)  # up over 30 % of 11 epochs
    assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] == pytest.approx(0.001)  # down to min_lr at the end


def test_warmup_multiplies_a_decaying_schedule_too_and_never_onecycle():
    s = schedule("cosine", t_max=10, warmup_epochs=2)
    assert scheduled_lr(s, 0.1, 1, 10) == pytest.approx(0.05)  # 1/2 of the cosine's first epoch
    assert scheduled_lr(s, 0.1, 2, 10) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 10)))  # already decaying
    from dbx.spec import SpecError, spec_from_dict

    base = {"name": "x", "data": {"name": "digits"}, "model": {"name": "mlp"}, "optimizer": {"lr": 0.1},
            "epochs": 5, "policy": {"name": "fixed"}}
    with pytest.raises(SpecError, match="rises on its own"):
        spec_from_dict({**base, "schedule": {"name": "onecycle", "warmup_epochs": 1}})


def test_the_schedule_is_a_function_of_the_epoch_whatever_the_batch_size():
    """dbx sets the lr once per epoch from the epoch number alone: a run whose batch size (and so
    its number of steps) changes sees the same schedule as one at a fixed batch size."""
    from dbx.spec import spec_from_dict
    from dbx.train.loop import RunState, _lr_for

    spec = spec_from_dict({"name": "x", "data": {"name": "digits"}, "model": {"name": "mlp"},
                           "optimizer": {"name": "adamw", "params": {"lr": 1e-3}}, "epochs": 8,
                           "schedule": {"name": "onecycle"}, "policy": {"name": "fixed"}})
    lrs = [_lr_for(spec, RunState(epoch=e - 1, batch_size=b), e) for e, b in zip(range(1, 9), (8, 8, 64, 64, 512, 512, 512, 512))]
    assert lrs == [scheduled_lr(spec.schedule, 1e-3, e, 8) for e in range(1, 9)]

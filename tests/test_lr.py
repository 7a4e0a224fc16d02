"""Learning-rate schedules (pure functions of the epoch) and the batch-size rescale rules."""
import math
from types import SimpleNamespace

import pytest

from dbx.train.lr import rescale_factor, scheduled_lr


def schedule(name="constant", **kw):
    base = dict(name=name, t_max=None, milestones=[], gamma=0.1, step_size=None, warmup_epochs=0, min_lr=0.0)
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

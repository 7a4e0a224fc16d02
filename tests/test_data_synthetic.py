"""The synthetic datasets: shapes, dtypes, determinism under the seed, and the noise model."""
import math

import pytest
import torch

from dbx import registry
from dbx.data import resolve_root, take_subset
from dbx.data.synthetic import synthetic_linear, synthetic_logistic
from dbx.errors import UserError


def test_logistic_shapes_and_dtypes():
    splits = synthetic_logistic(n=1000, d=16, test_fraction=0.2, seed=0)
    (x, y), (xt, _) = splits.train, splits.test
    assert x.shape == (800, 16) and xt.shape == (200, 16)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.shape == (800,) and set(y.unique().tolist()) == {0, 1}
    assert splits.num_classes == 2 and splits.input_shape == (16,)
    assert x.min() >= -1 and x.max() <= 1


def test_same_seed_same_data_other_seed_other_data():
    a = synthetic_logistic(n=500, d=8, seed=3)
    b = synthetic_logistic(n=500, d=8, seed=3)
    c = synthetic_logistic(n=500, d=8, seed=4)
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.train[1], b.train[1])
    assert not torch.equal(a.train[0], c.train[0])


def test_data_seed_fixes_the_data_across_run_seeds():
    a = synthetic_logistic(n=500, d=8, seed=1, data_seed=7)
    b = synthetic_logistic(n=500, d=8, seed=2, data_seed=7)
    assert torch.equal(a.train[0], b.train[0])


def test_labels_are_the_noisy_sign_of_a_linear_logit():
    # Same features and logit; only the label noise differs.
    clean = synthetic_logistic(n=4000, d=8, noise=0.0, seed=0)
    noisy = synthetic_logistic(n=4000, d=8, noise=1.0, seed=0)
    assert torch.equal(clean.train[0], noisy.train[0])
    flipped = (clean.train[1] != noisy.train[1]).float().mean().item()
    # P(flip) = arctan(noise) / pi for a standard normal logit: 0.25 at noise 1
    assert abs(flipped - math.atan(1.0) / math.pi) < 0.03


def test_linear_is_regression():
    splits = synthetic_linear(n=1000, d=4, noise=0.1, seed=0)
    x, y = splits.train
    assert splits.num_classes is None
    assert y.shape == (800, 1) and y.dtype == torch.float32
    # least squares recovers the noise level
    w = torch.linalg.lstsq(x.double(), y.double()).solution
    residual = (y.double() - x.double() @ w).std().item()
    assert residual == pytest.approx(0.1, rel=0.15)


def test_bad_parameters_are_user_errors():
    with pytest.raises(UserError, match="test_fraction"):
        synthetic_logistic(n=100, d=2, test_fraction=1.5)


def test_registered_and_built_through_the_registry():
    splits = registry.build("dataset", "synthetic_logistic", {"n": 100, "d": 3}, root="/nowhere", seed=5)
    assert splits.train[0].shape == (80, 3)
    assert registry.check_params("dataset", "synthetic_linear", {"n": 10, "noise": 1}) == []
    assert registry.check_params("dataset", "synthetic_linear", {"nosie": 0.1})  # typo is reported


def test_resolve_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DBX_DATA_ROOT", str(tmp_path / "env"))
    assert resolve_root(None) == str(tmp_path / "env")
    assert resolve_root(str(tmp_path / "given")) == str(tmp_path / "given")
    monkeypatch.setenv("SOMEWHERE", str(tmp_path))
    assert resolve_root("$SOMEWHERE/x") == str(tmp_path / "x")
    monkeypatch.delenv("DBX_DATA_ROOT")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_root(None) == str(tmp_path / "data")
    assert resolve_root("~/d") == str(tmp_path / "d")


def test_take_subset_of_tensors():
    splits = synthetic_logistic(n=1000, d=4, seed=0)
    small = take_subset(splits, 100, seed=1)
    again = take_subset(splits, 100, seed=1)
    other = take_subset(splits, 100, seed=2)
    assert small.train[0].shape == (100, 4) and small.train[1].shape == (100,)
    assert torch.equal(small.train[0], again.train[0])
    assert not torch.equal(small.train[0], other.train[0])
    assert small.test is splits.test  # the test split is untouched
    # every subset row is a row of the training split, with its own label
    rows = {tuple(r.tolist()): int(l) for r, l in zip(*splits.train)}
    assert all(rows[tuple(r.tolist())] == int(l) for r, l in zip(*small.train))


def test_take_subset_of_a_dataset():
    dataset = torch.utils.data.TensorDataset(torch.arange(50.0).unsqueeze(1), torch.arange(50))
    splits = synthetic_logistic(n=100, d=1)
    splits.train = dataset
    small = take_subset(splits, 10, seed=0)
    assert len(small.train) == 10
    assert [int(small.train[i][1]) for i in range(10)] == sorted(int(small.train[i][1]) for i in range(10))


def test_take_subset_larger_than_the_split_is_a_clear_error():
    splits = synthetic_logistic(n=100, d=2)
    with pytest.raises(UserError, match="only 80 samples"):
        take_subset(splits, 81, seed=0)

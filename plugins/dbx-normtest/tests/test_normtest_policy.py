"""The normtest policy: dbx's contract checks, then the norm test itself."""
import math
from importlib.metadata import entry_points

import pytest
from dbx_normtest import NormTest, gradient_statistics

from dbx.protocols import DiversityEstimate
from dbx.testing import check_policy, diversity_estimate, epoch_state

N = 50_000


def test_keeps_the_dbx_policy_contract():
    # normtest refuses estimates without per-sample statistics, with an error naming sum_sq_norms;
    # check_policy accepts that and drives it with estimates that have the sums
    check_policy(NormTest, dataset_size=N, bounds=(128, 4096))
    check_policy(NormTest, dataset_size=N, params={"initial": 8, "max": 64, "measure_every": 5}, bounds=(8, 64))


def test_is_registered_as_normtest_in_dbx_policies():
    found = [ep for ep in entry_points(group="dbx.policies") if ep.name == "normtest"]
    assert found, "dbx-normtest is not installed here; run `pip install -e .` in plugins/dbx-normtest"
    assert found[0].load() is NormTest


def test_statistics_from_the_sums():
    # four per-sample gradients in 1-D: 1, 2, 3, 6 -> mean 3, sample variance 14/3
    s1, total = 1 + 4 + 9 + 36, 1 + 2 + 3 + 6
    variance, mean_sq = gradient_statistics(DiversityEstimate(value=s1 / total**2, samples=4, sum_sq_norms=s1,
                                                              sq_norm_of_sum=total**2))
    assert variance == pytest.approx(14 / 3)
    assert mean_sq == pytest.approx(9.0)


def test_the_batch_grows_to_the_smallest_size_that_passes():
    rule = NormTest(initial=128, max=100_000, theta=0.5)
    estimate = diversity_estimate(1000.0, samples=N)  # tr(Sigma) = 1000 ||G||^2
    variance, mean_sq = gradient_statistics(estimate)
    expected = math.ceil(variance / (0.25 * mean_sq))  # about 1000 / theta^2 = 4000
    assert 3900 < expected < 4100
    assert rule.next_batch_size(epoch_state(1, 128), estimate) == expected
    assert rule.next_batch_size(epoch_state(2, expected), estimate) == expected  # now it passes


def test_a_passing_test_keeps_the_batch_and_it_never_shrinks():
    rule = NormTest(initial=128, theta=0.9)
    assert rule.next_batch_size(epoch_state(1, 2048), diversity_estimate(10.0, samples=N)) == 2048


def test_capped_at_max_and_a_zero_mean_gradient_asks_for_max():
    rule = NormTest(initial=128, max=1024)
    assert rule.next_batch_size(epoch_state(1, 128), diversity_estimate(1e6, samples=N)) == 1024
    zero_mean = DiversityEstimate(value=math.inf, samples=N, sum_sq_norms=5.0, sq_norm_of_sum=0.0)
    assert rule.next_batch_size(epoch_state(1, 128), zero_mean) == 1024


def test_an_estimator_without_sums_is_a_clear_error():
    with pytest.raises(ValueError, match="sum_sq_norms.*estimator: {name: exact}"):
        NormTest().next_batch_size(epoch_state(1, 128), diversity_estimate(value=0.01, samples=N))

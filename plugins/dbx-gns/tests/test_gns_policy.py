"""The gns policy: dbx's contract checks, then the rule itself, number by number."""
import math
from importlib.metadata import entry_points

import pytest
from dbx_gns import GradientNoiseScale, noise_scale

from dbx.testing import check_policy, diversity_estimate, epoch_state, simulate_policy

N = 50_000


def test_keeps_the_dbx_policy_contract():
    check_policy(GradientNoiseScale, dataset_size=N, bounds=(128, 4096))
    check_policy(GradientNoiseScale, dataset_size=N, params={"initial": 32, "min": 8, "max": 512, "smoothing": 0.0,
                                                              "min_change": 0.0, "measure_every": 3}, bounds=(8, 512))


def test_is_registered_as_gns_in_dbx_policies():
    found = [ep for ep in entry_points(group="dbx.policies") if ep.name == "gns"]
    assert found, "dbx-gns is not installed here; run `pip install -e .` in plugins/dbx-gns"
    (entry,) = found
    assert entry.value == "dbx_gns.policy:GradientNoiseScale"
    assert entry.load() is GradientNoiseScale


@pytest.mark.parametrize("b_simple", [0.0, 3.0, 250.0, 10_000.0])
def test_noise_scale_inverts_the_diversity_identity(b_simple):
    # n * diversity = 1 + B_simple to first order; the estimate is unbiased at any n
    estimate = diversity_estimate(b_simple, samples=N)
    assert estimate.samples * estimate.value == pytest.approx(1 + b_simple, rel=0.2)
    assert noise_scale(estimate) == pytest.approx(b_simple, abs=1e-6 * max(1.0, b_simple))


def test_noise_scale_of_degenerate_estimates():
    assert noise_scale(diversity_estimate(value=math.inf, samples=N)) == math.inf  # gradient ~ 0: all noise
    assert noise_scale(diversity_estimate(value=1.5, samples=N)) == math.inf
    assert noise_scale(diversity_estimate(value=math.nan, samples=N)) is None  # nothing measured
    assert noise_scale(diversity_estimate(value=0.5, samples=1)) is None
    assert noise_scale(diversity_estimate(value=0.5 / N, samples=N)) == 0.0  # never negative


def policy(**params):
    defaults = {"initial": 128, "min": 16, "max": 4096, "smoothing": 0.0, "min_change": 0.0}
    return GradientNoiseScale(dataset_size=N, **{**defaults, **params})


def test_batch_follows_multiplier_times_noise_scale_within_bounds():
    assert policy().next_batch_size(epoch_state(1, 128), diversity_estimate(1000.0, samples=N)) == 1000
    assert policy(multiplier=2.0).next_batch_size(epoch_state(1, 128), diversity_estimate(1000.0, samples=N)) == 2000
    assert policy().next_batch_size(epoch_state(1, 128), diversity_estimate(1e6, samples=N)) == 4096
    assert policy().next_batch_size(epoch_state(1, 128), diversity_estimate(2.0, samples=N)) == 16
    assert policy().next_batch_size(epoch_state(1, 128), diversity_estimate(value=math.inf, samples=N)) == 4096
    assert policy().next_batch_size(epoch_state(1, 128), diversity_estimate(value=math.nan, samples=N)) == 128
    assert policy().next_batch_size(epoch_state(1, 128), None) == 128


def test_min_defaults_to_the_initial_batch_size():
    rule = GradientNoiseScale(dataset_size=N, initial=64, smoothing=0.0)
    assert rule.next_batch_size(epoch_state(1, 64), diversity_estimate(2.0, samples=N)) == 64


def test_smoothing_averages_the_noise_scale_across_measurements():
    rule = policy(smoothing=0.5)
    assert rule.next_batch_size(epoch_state(1, 128), diversity_estimate(1000.0, samples=N)) == 1000
    # s = 0.5 * 1000 + 0.5 * 2000
    assert rule.next_batch_size(epoch_state(2, 1000), diversity_estimate(2000.0, samples=N)) == 1500


def test_hysteresis_ignores_small_changes():
    rule = policy(min_change=0.1)
    assert rule.next_batch_size(epoch_state(1, 1000), diversity_estimate(1050.0, samples=N)) == 1000  # 5%: stay
    assert rule.next_batch_size(epoch_state(2, 1000), diversity_estimate(1200.0, samples=N)) == 1200  # 20%: move


def test_a_steady_noise_scale_gives_a_steady_batch():
    rule = policy(smoothing=0.8, min_change=0.1)
    jitter = [1000.0, 1040.0, 980.0, 1030.0, 960.0, 1010.0] * 3
    used = simulate_policy(rule, epochs=len(jitter), dataset_size=N,
                           estimates=lambda epoch: diversity_estimate(jitter[epoch - 1], samples=N))
    assert len(set(used[2:])) == 1  # after the first resize, the jitter never moves it


def test_measures_only_every_kth_epoch():
    assert [e for e in range(1, 13) if policy(measure_every=4).measures_in(e)] == [4, 8, 12]


@pytest.mark.parametrize("params, message", [
    ({"initial": 0}, "initial must be a positive integer"),
    ({"min": 256}, "min <= initial <= max"),
    ({"smoothing": 1.0}, "smoothing must be in"),
    ({"multiplier": -1.0}, "multiplier must be"),
])
def test_bad_params_are_rejected_with_the_parameter_named(params, message):
    with pytest.raises(ValueError, match=message):
        policy(**params)

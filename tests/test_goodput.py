"""The goodput policy: noise scale from the diversity, efficiency x measured throughput, hysteresis.

Every test drives the policy with synthetic inputs whose answer is known: a noise scale put into
the estimate's sums (``dbx.testing.diversity_estimate``) and a machine whose step takes
``a + b B`` seconds (``dbx.testing.throughput_table``).
"""
import json
import math

import pytest

from dbx.policies.divebatch import DiveBatch
from dbx.policies.goodput import (
    Goodput,
    efficiency,
    fit_step_time,
    noise_terms,
    optimal_batch_size,
)
from dbx.testing import check_policy, diversity_estimate, epoch_state, simulate_policy, throughput_table


def machine(fixed: float, per_sample: float):
    """A device whose optimizer step at batch size B takes ``fixed + per_sample * B`` seconds."""
    return lambda batch: fixed + per_sample * batch


def brute_force_optimum(noise: float, step_seconds, low: int, high: int, reference: int) -> int:
    return max(range(low, high + 1), key=lambda b: efficiency(noise, b, reference) * b / step_seconds(b))


def drive(policy, epochs, noise_of_epoch, step_seconds, dataset_size=50_000):
    """The batch size of each epoch when the estimates carry ``noise_of_epoch(epoch)`` as B_simple."""
    return simulate_policy(policy, epochs=epochs, dataset_size=dataset_size, step_seconds=step_seconds,
                           estimates=lambda e: diversity_estimate(noise_of_epoch(e), samples=dataset_size))


# -- the noise scale: the identity between the diversity and B_simple ----------------------------------

@pytest.mark.parametrize("noise", [0.5, 37.0, 1_000.0, 40_000.0])
@pytest.mark.parametrize("samples", [64, 10_000])
def test_the_noise_scale_comes_back_exactly_from_the_sums_and_from_the_diversity_alone(noise, samples):
    estimate = diversity_estimate(noise, samples=samples, gradient_sq_norm=3.0)
    grad_sq, trace = noise_terms(estimate)
    assert grad_sq == pytest.approx(3.0, rel=1e-9)
    assert trace / grad_sq == pytest.approx(noise, rel=1e-9)
    # (m D - 1) / (1 - D): the same number from the value alone (an estimator without the sums)
    only_value = diversity_estimate(value=estimate.value, samples=samples)
    grad_sq, trace = noise_terms(only_value)
    assert trace / grad_sq == pytest.approx(noise, rel=1e-9)
    d = estimate.value
    assert trace / grad_sq == pytest.approx((samples * d - 1) / (1 - d), rel=1e-9)


def test_n_times_diversity_is_one_plus_the_noise_scale_only_while_it_is_small_against_n():
    n = 10_000
    small, large = diversity_estimate(50.0, samples=n), diversity_estimate(3_475.0, samples=n)
    assert n * small.value - 1 == pytest.approx(50.0, rel=0.01)
    assert n * large.value - 1 == pytest.approx(2_579, rel=0.001)  # 26 % below B_simple = 3,475


@pytest.mark.parametrize("estimate", [
    diversity_estimate(value=math.inf, samples=1000),
    diversity_estimate(value=1.5, samples=1000),  # diversity >= 1: the mean gradient is not resolved
])
def test_gradients_that_cancel_mean_the_noise_dominates(estimate):
    policy = Goodput(initial=32, max=1024)
    policy.next_batch_size(epoch_state(1, 32, throughput={32: 3200.0}), estimate)
    assert policy.noise_scale() == math.inf
    assert efficiency(math.inf, 1024, 32) == 1.0


def test_an_estimate_without_samples_or_with_nan_is_ignored():
    policy = Goodput(initial=32)
    for bad in (diversity_estimate(value=math.nan, samples=1000), diversity_estimate(value=0.5, samples=1)):
        assert policy.next_batch_size(epoch_state(1, 32, throughput={32: 3200.0}), bad) == 32
        assert policy.noise_scale() is None and policy.metrics() == {}


# -- the model: efficiency, step time, optimum ---------------------------------------------------------

def test_efficiency_is_one_at_the_reference_and_falls_as_mccandlish_predicts():
    assert efficiency(100.0, 32, 32) == 1.0
    assert efficiency(100.0, 132, 32) == pytest.approx(132 / 232)
    assert efficiency(0.0, 64, 32) == pytest.approx(0.5)  # no noise: a bigger batch is pure waste per sample


def test_the_step_time_fit_recovers_a_linear_machine_and_keeps_both_terms_non_negative():
    table = throughput_table(machine(2e-3, 4e-5), [32, 100, 400])
    a, b = fit_step_time(table)
    assert a == pytest.approx(2e-3, rel=1e-9) and b == pytest.approx(4e-5, rel=1e-9)
    # a machine whose steps take the same time whatever B (all fixed cost), and one with none
    assert fit_step_time(throughput_table(lambda b: 0.01, [32, 64, 128])) == pytest.approx((0.01, 0.0))
    assert fit_step_time({32: 1000.0, 64: 1000.0}) == pytest.approx((0.0, 1e-3))
    # one point: half of its step is taken as fixed cost; none: no model
    assert fit_step_time({64: 6400.0}) == pytest.approx((5e-3, 5e-3 / 64))
    assert fit_step_time({}) is None


@pytest.mark.parametrize("noise,fixed,per_sample", [(300.0, 2e-3, 1e-4), (5_000.0, 1e-3, 1e-6), (50.0, 1e-4, 1e-4)])
def test_the_closed_form_optimum_is_the_brute_force_one(noise, fixed, per_sample):
    best = optimal_batch_size(noise, fixed, per_sample, 10**6)
    assert best == pytest.approx(math.sqrt(noise * fixed / per_sample))
    found = brute_force_optimum(noise, machine(fixed, per_sample), 1, 20_000, 32)
    assert abs(found - best) <= 1


# -- decisions -----------------------------------------------------------------------------------------

def test_it_settles_on_the_known_optimum():
    step = machine(2e-3, 2e-5)  # a / b = 100 samples
    noise = 900.0  # B* = sqrt(900 * 100) = 300
    used = drive(Goodput(initial=32, max=2048, hysteresis=0.0), 8, lambda e: noise, step)
    # into untried sizes at most probe_factor (2) beyond the measured ones, then the optimum
    assert used == [32, 64, 128, 256, 300, 300, 300, 300]
    assert used[-1] == brute_force_optimum(noise, step, 32, 2048, 32)
    # with the default hysteresis it stops at 256, whose goodput is within 5 % of 300's
    assert drive(Goodput(initial=32, max=2048), 8, lambda e: noise, step)[3:] == [256] * 5


def test_the_fit_is_trusted_only_near_the_measured_sizes():
    policy = Goodput(initial=32, max=4096, probe_factor=2.0)
    table = throughput_table(machine(1e-2, 1e-6), [32, 100])  # the fit says: as large as possible
    assert policy.next_batch_size(epoch_state(2, 100, throughput=table), diversity_estimate(1e6)) == 200


def test_it_follows_a_growing_noise_scale_within_the_hysteresis():
    step = machine(2e-3, 2e-5)
    noise = lambda e: 100.0 * e * e  # noqa: E731 - the optimum sqrt(noise * 100) grows 100, 200, ...
    used = drive(Goodput(initial=32, max=4096, hysteresis=0.05), 12, noise, step)
    assert used[2:] == sorted(used[2:]) and used[-1] > 4 * used[2]

    def goodput(batch, epoch):
        return efficiency(noise(epoch), batch, 32) * batch / step(batch)

    for epoch in range(3, 12):  # the size chosen after epoch e is within 5 % of e's best goodput
        best = brute_force_optimum(noise(epoch), step, 32, 4096, 32)
        assert goodput(used[epoch], epoch) >= goodput(best, epoch) / 1.05


@pytest.mark.parametrize("noise,expected", [(1e7, 512), (math.inf, 512), (0.0, 64)])
def test_it_stays_within_min_and_max(noise, expected):
    used = drive(Goodput(initial=64, max=512), 6, lambda e: noise, machine(1e-3, 1e-5))
    assert all(64 <= b <= 512 for b in used)
    assert used[-1] == expected


def test_min_lets_it_go_below_the_initial_batch_when_larger_steps_do_not_pay():
    step = machine(0.0, 1e-4)  # no fixed cost: throughput is the same at every B
    used = drive(Goodput(initial=128, min=16, max=1024), 5, lambda e: 50.0, step)
    assert used[-1] == 16 and min(used) >= 16


def test_saturating_hardware_gets_a_smaller_batch_than_divebatch_and_growing_hardware_a_larger_one():
    n, noise, delta = 50_000, 4_000.0, 0.1
    divebatch = simulate_policy(DiveBatch(dataset_size=n, initial=32, max=4096, delta=delta, resize_every=1),
                                epochs=4, dataset_size=n,
                                estimates=lambda e: diversity_estimate(noise, samples=n))
    assert divebatch[-1] == int(delta * n * (1 + noise) / (n + noise))  # delta n D = 370, about delta B_simple
    exact = dict(initial=32, max=4096, hysteresis=0.0)  # the optimum itself, not a size within 5 % of it
    saturating = drive(Goodput(**exact), 10, lambda e: noise, machine(1e-4, 1e-5))  # a / b = 10
    growing = drive(Goodput(**exact), 10, lambda e: noise, machine(1e-2, 1e-6))  # a / b = 10,000
    assert saturating[-1] == round(math.sqrt(noise * 10)) < divebatch[-1]
    assert growing[-1] == 4096 > divebatch[-1]


def test_noisy_estimates_do_not_make_it_oscillate():
    step = machine(2e-3, 2e-5)
    wobble = [900.0 * (1.3 if e % 2 else 0.7) for e in range(40)]  # +-30 % around B_simple = 900
    used = drive(Goodput(initial=32, max=2048), 40, lambda e: wobble[e - 1], step)
    changes = [i for i in range(1, len(used)) if used[i] != used[i - 1]]
    assert len(changes) <= 3, used  # the prior's move, the fit's correction, at most one more
    assert all(b == used[-1] for b in used[changes[-1]:])
    assert used[-1] == pytest.approx(300, rel=0.25)


def test_a_gain_below_the_hysteresis_keeps_the_batch_size():
    step = machine(2e-3, 2e-5)
    table = throughput_table(step, [32, 250])
    estimate = diversity_estimate(900.0, samples=50_000)  # optimum 300; at 250 the goodput is 0.4 % lower
    stays = Goodput(initial=32, hysteresis=0.05)
    assert stays.next_batch_size(epoch_state(3, 250, throughput=table), estimate) == 250
    moves = Goodput(initial=32, hysteresis=0.0)
    assert moves.next_batch_size(epoch_state(3, 250, throughput=table), estimate) == 300


def test_an_underdetermined_fit_is_probed_once():
    # noise scale 32 = B0: the prior's optimum is sqrt(32 * 32) = 32, so it would never learn more
    step = machine(2e-3, 2e-5)
    used = drive(Goodput(initial=32, max=1024, probe_factor=2.0), 6, lambda e: 32.0, step)
    assert used[:2] == [32, 64]
    assert used.count(64) >= 1 and 32 <= used[-1] <= 64
    at_max = Goodput(initial=32, max=32, min=16)
    assert at_max.next_batch_size(epoch_state(1, 32, throughput={32: 3200.0}), diversity_estimate(32.0)) == 16


def test_it_waits_for_an_estimate_and_for_timings_before_it_moves():
    policy = Goodput(initial=32, measure_every=3)
    assert [e for e in range(1, 11) if policy.measures_in(e)] == [1, 4, 7, 10]
    assert policy.next_batch_size(epoch_state(1, 32, throughput={32: 3200.0}), None) == 32  # no estimate yet
    assert policy.next_batch_size(epoch_state(1, 32), diversity_estimate(500.0)) == 32  # no timings
    assert policy.next_batch_size(epoch_state(2, 32, throughput={32: 3200.0}), None) != 32  # the last estimate


def test_its_decisions_are_explained_by_its_metrics():
    step = machine(2e-3, 2e-5)
    policy = Goodput(initial=32, max=2048)
    chosen = policy.next_batch_size(epoch_state(2, 32, throughput=throughput_table(step, [32, 256])),
                                    diversity_estimate(900.0))
    m = policy.metrics()
    assert chosen == 300
    assert m["noise_scale"] == pytest.approx(900.0)
    assert m["efficiency"] == pytest.approx(efficiency(900.0, 300, 32))
    assert m["predicted_throughput"] == pytest.approx(300 / step(300))
    assert m["predicted_goodput"] == pytest.approx(m["efficiency"] * m["predicted_throughput"])
    assert m["step_fixed_seconds"] == pytest.approx(2e-3) and m["step_seconds_per_sample"] == pytest.approx(2e-5)
    assert m["probe"] == 0.0


def test_adascale_scales_the_lr_linearly_below_the_noise_scale_and_saturates_above_it():
    policy = Goodput(initial=32, adascale=True)
    assert policy.lr_factor(32, 64) == 1.0  # no estimate yet
    policy.next_batch_size(epoch_state(1, 32, throughput={32: 3200.0}), diversity_estimate(10_000.0))
    assert policy.lr_factor(32, 64) == pytest.approx(2 * 10_032 / 10_064)  # about linear
    gain = policy.lr_factor(32, 10**7)
    assert gain == pytest.approx((10**7 / (10_000 + 10**7)) / (32 / 10_032))  # at most 1 + B_simple / B0
    assert gain < 1 + 10_000 / 32
    assert policy.lr_factor(64, 32) == pytest.approx(1 / policy.lr_factor(32, 64))
    assert Goodput(initial=32).lr_factor(32, 64) == 1.0  # off: the spec's lr_scaling alone


# -- resume and the dbx contract -----------------------------------------------------------------------

def test_a_resumed_policy_continues_exactly():
    step = machine(2e-3, 2e-5)
    noise = lambda e: 300.0 * e  # noqa: E731
    smoothing = dict(initial=32, max=4096, smoothing=0.5)
    whole = drive(Goodput(**smoothing), 12, noise, step)
    first = Goodput(**smoothing)
    before = drive(first, 6, noise, step)
    saved = json.loads(json.dumps(first.state_dict()))  # plain data, as a checkpoint holds it
    resumed = Goodput(**smoothing)
    resumed.load_state_dict(saved)
    after = simulate_policy(resumed, epochs=6, dataset_size=50_000, start=whole[6], first_epoch=7,
                            step_seconds=step, earlier=before,
                            estimates=lambda e: diversity_estimate(noise(e), samples=50_000))
    assert before + after == whole


@pytest.mark.parametrize("params", [{}, {"initial": 32, "max": 512, "measure_every": 2, "smoothing": 0.7},
                                    {"initial": 64, "min": 8, "max": 64}, {"initial": 32, "adascale": True}])
def test_goodput_keeps_the_policy_contract(params):
    low = params.get("min", params.get("initial", 128))
    check_policy(Goodput, dataset_size=50_000, params=params, bounds=(low, params.get("max", 2048)))


@pytest.mark.parametrize("params,message", [
    ({"initial": 0}, "initial must be a positive integer"),
    ({"initial": 64, "max": 32}, "max (32) must be at least initial (64)"),
    ({"initial": 64, "min": 128}, "min (128) must be at most initial (64)"),
    ({"measure_every": 0}, "measure_every must be a positive integer"),
    ({"hysteresis": -0.1}, "hysteresis must be a finite number >= 0"),
    ({"smoothing": 1.0}, "smoothing must be a finite number >= 0 and < 1"),
    ({"probe_factor": 1.0}, "probe_factor must be a finite number > 1"),
    ({"hysteresis": math.nan}, "hysteresis must be a finite number"),
    ({"adascale": 1}, "adascale must be true or false"),
])
def test_bad_parameters_are_refused_naming_the_parameter(params, message):
    with pytest.raises(ValueError) as error:
        Goodput(**params)
    assert message in str(error.value)


def test_dbx_run_refuses_a_bad_parameter_before_anything_is_created(tmp_path):
    from click.testing import CliRunner

    from dbx.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\ndata: {name: synthetic_logistic}\nmodel: {name: logreg}\noptimizer: {lr: 0.1}\n"
                    "epochs: 2\npolicy: {name: goodput, params: {smoothing: 1.5}}\n")
    result = CliRunner().invoke(main, ["run", str(spec), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert result.exit_code == 2
    assert "policy 'goodput'" in result.output and "smoothing must be a finite number >= 0 and < 1" in result.output
    assert not (tmp_path / "m.db").exists()


def test_goodput_in_your_own_loop_reads_the_epoch_seconds_you_report():
    import dbx

    step = machine(2e-3, 2e-5)
    adaptive = dbx.AdaptiveBatchSize("goodput", {"initial": 32, "max": 1024}, dataset_size=50_000)
    estimate = diversity_estimate(900.0, samples=50_000)
    assert adaptive.end_epoch(1, estimate).batch_size == 32  # no seconds: no throughput, no decision
    used = []
    for epoch in range(2, 7):
        batch = adaptive.batch_size
        used.append(batch)
        adaptive.end_epoch(epoch, estimate, seconds=step(batch) * 50_000 / batch)
    assert used == [32, 64, 128, 256, 256]
    saved = json.loads(json.dumps(adaptive.state_dict()))
    again = dbx.AdaptiveBatchSize("goodput", {"initial": 32, "max": 1024}, dataset_size=50_000)
    again.load_state_dict(saved)
    assert again.throughput == adaptive.throughput
    assert again.end_epoch(7, estimate, seconds=step(256) * 50_000 / 256) == \
        adaptive.end_epoch(7, estimate, seconds=step(256) * 50_000 / 256)

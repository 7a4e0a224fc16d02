"""Every registered plugin keeps the contract of dbx.protocols, checked by dbx.testing.

The parameters come from the registry, so a new built-in (or an installed third-party plugin) is
checked the moment its entry point exists. The second half shows that the checks catch what they
claim to, on deliberately broken plugins.
"""
import math
from typing import Any

import pytest

from dbx import registry
from dbx.testing import (
    ContractError,
    check_dataset,
    check_estimator,
    check_model,
    check_policy,
    diversity_estimate,
    epoch_state,
    simulate_policy,
)


@pytest.mark.parametrize("name", sorted(registry.available("policy")))
def test_every_policy_keeps_the_contract(name):
    check_policy(registry.load("policy", name), dataset_size=50_000)


@pytest.mark.parametrize("name", sorted(registry.available("estimator")))
def test_every_estimator_keeps_the_contract(name):
    estimate = check_estimator(registry.load("estimator", name))
    assert estimate.samples == 48  # every built-in sees all samples of this small epoch


@pytest.mark.parametrize("name", sorted(registry.available("model")))
def test_every_model_keeps_the_contract(name):
    check_model(registry.load("model", name), input_shape=(3, 32, 32), num_classes=10)


@pytest.mark.parametrize("name", sorted(registry.available("dataset")))
def test_every_dataset_keeps_the_contract(name, tmp_path):
    # with an empty root, a dataset either builds (synthetic, bundled) or says where it looked
    check_dataset(registry.load("dataset", name), root=str(tmp_path), allow_missing=True)


def test_the_checks_inject_what_dbx_injects():
    from dbx import testing

    assert testing._INJECTED is registry.INJECTED


# --- the checks catch broken plugins ----------------------------------------------------------

class Good:
    uses_diversity = True

    def __init__(self, *, dataset_size: int, initial: int = 64, max: int = 1024) -> None:
        self.initial, self.max, self.grown = initial, max, 0

    def initial_batch_size(self) -> int:
        return self.initial

    def measures_in(self, epoch: int) -> bool:
        return epoch % 2 == 0

    def next_batch_size(self, state, diversity) -> int:
        if diversity is None or not math.isfinite(diversity.value):
            return state.batch_size
        self.grown += 1
        return min(self.initial * 2 ** self.grown, self.max)

    def state_dict(self) -> dict[str, Any]:
        return {"grown": self.grown}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grown = state["grown"]


def problems_of(factory, **kwargs) -> list[str]:
    with pytest.raises(ContractError) as err:
        check_policy(factory, **kwargs)
    return err.value.problems


def test_a_good_policy_passes_and_the_helpers_drive_it_like_the_loop():
    sizes = check_policy(Good, dataset_size=1000, bounds=(64, 1024))
    assert set(sizes) == {"varied", "non-finite", "extremes"}
    assert simulate_policy(Good(dataset_size=1000), epochs=6, dataset_size=1000,
                           estimates=lambda e: diversity_estimate(10.0, samples=1000)) == [64, 64, 128, 128, 256, 256]
    estimate = diversity_estimate(99.0, samples=1000)
    assert estimate.samples * estimate.value == pytest.approx(1 + 99.0, rel=0.1)
    assert epoch_state(3, 100, dataset_size=1000).samples_seen == 3000


def test_a_state_dict_that_misses_state_breaks_resume():
    class Forgetful(Good):
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    [problem, *_] = [p for p in problems_of(Forgetful, dataset_size=1000) if "restored from state_dict()" in p]
    assert ("scenario 'varied': restored from state_dict() after every epoch, it chose batch size 128 after "
            "epoch 4 where the uninterrupted policy chose 256 (epochs 1-3 agreed)") in problem


def test_every_problem_is_reported_at_once():
    class Sloppy(Good):
        uses_diversity = "yes"

        def __init__(self, dataset_size, *, initial=64, max: int = "big") -> None:  # noqa: ANN001
            super().__init__(dataset_size=dataset_size, initial=initial, max=1024)

        def next_batch_size(self, state, diversity):
            return state.batch_size * 1.5

    problems = problems_of(Sloppy, dataset_size=1000)
    text = "\n".join(problems)
    assert "uses_diversity must be a bool" in text
    assert "'dataset_size' is not keyword-only" in text
    assert "'initial' has no type hint" in text
    assert "the default of 'max' ('big') does not match its type hint" in text
    assert "it must be a positive int" in text  # 96.0 is a float


def test_batch_sizes_outside_the_bounds_and_crashes_on_nan_are_caught():
    class Crashes(Good):
        def next_batch_size(self, state, diversity):
            if diversity is not None:  # int(nan) raises ValueError
                return min(max(int(diversity.samples * min(diversity.value, 1.0)), 64), 1024)
            return state.batch_size

    class Unbounded(Good):
        def next_batch_size(self, state, diversity):
            return state.batch_size * 2

    text = "\n".join(problems_of(Crashes, dataset_size=1000, bounds=(64, 1024)))
    assert "scenario 'non-finite'" in text and "raised ValueError: cannot convert float NaN to integer" in text
    text = "\n".join(problems_of(Unbounded, dataset_size=1000, bounds=(64, 1024)))
    assert "next_batch_size returned 2048, outside the bounds [64, 1024]" in text


def test_nondeterminism_is_caught():
    import random

    class Dice(Good):
        def next_batch_size(self, state, diversity):
            return random.choice([64, 128, 256, 512])

    assert any("two policies built alike chose different" in p for p in problems_of(Dice, dataset_size=1000))


def test_a_policy_may_refuse_estimates_without_sums_if_it_names_them():
    class NeedsSums(Good):
        def next_batch_size(self, state, diversity):
            if diversity is not None and diversity.sum_sq_norms is None:
                raise ValueError("needs sum_sq_norms: use estimator exact")
            return super().next_batch_size(state, diversity)

    class Cryptic(Good):
        def next_batch_size(self, state, diversity):
            if diversity is not None and diversity.sum_sq_norms is None:
                raise TypeError("unsupported operand")
            return super().next_batch_size(state, diversity)

    check_policy(NeedsSums, dataset_size=1000)
    assert any("should name sum_sq_norms" in p for p in problems_of(Cryptic, dataset_size=1000))


def test_an_estimator_that_leaves_hooks_or_keeps_accumulating_is_caught():
    from dbx.estimators.exact import ExactEstimator

    class Leaky(ExactEstimator):
        def detach(self):
            pass  # hooks stay, sums are never reset

    with pytest.raises(ContractError) as err:
        check_estimator(Leaky)
    text = "\n".join(err.value.problems)
    assert "hooks left" in text

"""The built-in batch-size policies, checked against the rules they cite (docs/algorithm.md)."""
import math

import pytest

from dbx.policies.adabatch import AdaBatch
from dbx.policies.divebatch import DiveBatch
from dbx.policies.fixed import FixedBatch
from dbx.protocols import BatchSizePolicy, DiversityEstimate, EpochState


def state(epoch: int, batch_size: int, dataset_size: int = 50_000) -> EpochState:
    return EpochState(epoch=epoch, epochs=200, step=0, batch_size=batch_size, lr=0.1, samples_seen=0,
                      dataset_size=dataset_size, train_loss=1.0, test_loss=1.0)


def diversity(value: float) -> DiversityEstimate:
    return DiversityEstimate(value=value, samples=50_000)


def run_policy(policy, epochs: int, diversities=lambda epoch: 1e-3):
    """Drive a policy like the training loop does; return the batch size used in each epoch."""
    batch, used = policy.initial_batch_size(), []
    for epoch in range(1, epochs + 1):
        used.append(batch)
        measured = diversity(diversities(epoch)) if policy.uses_diversity and policy.measures_in(epoch) else None
        batch = policy.next_batch_size(state(epoch, batch), measured)
    return used


@pytest.mark.parametrize("policy", [FixedBatch(), AdaBatch(), DiveBatch(dataset_size=1000)])
def test_every_builtin_satisfies_the_protocol(policy):
    assert isinstance(policy, BatchSizePolicy)


def test_fixed_never_changes():
    assert set(run_policy(FixedBatch(batch_size=64), 30)) == {64}


def test_adabatch_doubles_every_20_epochs_up_to_the_cap():
    used = run_policy(AdaBatch(initial=128, max=2048, every=20, factor=2), 120)
    assert used[0] == used[19] == 128
    assert used[20] == 256 and used[40] == 512 and used[60] == 1024 and used[80] == 2048
    assert used[100] == used[119] == 2048


def test_adabatch_lr_decay_only_when_the_batch_grows():
    policy = AdaBatch(lr_decay=0.75)
    assert policy.lr_factor(128, 256) == 0.75
    assert policy.lr_factor(2048, 2048) == 1.0


def test_divebatch_follows_delta_n_diversity():
    # B_next = int(min(max(delta * n * diversity, B), B_max)) = int(0.1 * 50000 * 0.01) = 50 < 128 -> stays
    policy = DiveBatch(dataset_size=50_000, initial=128, max=2048, delta=0.1, resize_every=20)
    assert policy.next_batch_size(state(20, 128), diversity(0.01)) == 128
    # 0.1 * 50000 * 0.1 = 500
    assert policy.next_batch_size(state(20, 128), diversity(0.1)) == 500
    # capped at max
    assert policy.next_batch_size(state(40, 500), diversity(10.0)) == 2048


def test_divebatch_is_monotone_even_when_diversity_falls():
    used = run_policy(DiveBatch(dataset_size=50_000, initial=128, resize_every=2),
                      12, diversities=lambda epoch: 0.2 if epoch == 2 else 0.001)
    assert used == sorted(used)
    assert max(used) == 1000  # int(0.1 * 50000 * 0.2), then it never comes back down


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_divebatch_nonfinite_diversity_jumps_to_max(bad):
    policy = DiveBatch(dataset_size=50_000, initial=128, max=2048, resize_every=20)
    assert policy.next_batch_size(state(20, 128), diversity(bad)) == 2048


def test_divebatch_measures_only_at_resize_points_while_below_max():
    policy = DiveBatch(dataset_size=50_000, initial=128, max=2048, resize_every=20)
    assert [e for e in range(1, 101) if policy.measures_in(e)] == [20, 40, 60, 80, 100]
    policy.next_batch_size(state(20, 128), diversity(1.0))  # jumps to the cap
    assert not any(policy.measures_in(e) for e in range(21, 101))


def test_divebatch_changes_only_at_resize_points():
    used = run_policy(DiveBatch(dataset_size=50_000, initial=128, resize_every=5), 30,
                      diversities=lambda epoch: 0.01 * epoch)
    changes = [epoch for epoch in range(1, 30) if used[epoch] != used[epoch - 1]]
    assert changes and all(epoch % 5 == 0 for epoch in changes)


def test_divebatch_state_round_trips():
    policy = DiveBatch(dataset_size=50_000, resize_every=20)
    policy.next_batch_size(state(20, 128), diversity(1.0))
    restored = DiveBatch(dataset_size=50_000, resize_every=20)
    restored.load_state_dict(policy.state_dict())
    assert [restored.measures_in(e) for e in (40, 60)] == [policy.measures_in(e) for e in (40, 60)]


@pytest.mark.parametrize("factory, params, message", [
    (FixedBatch, {"batch_size": 0}, "batch_size must be a positive integer"),
    (AdaBatch, {"initial": 256, "max": 128}, "max (128) must be at least initial (256)"),
    (DiveBatch, {"dataset_size": 10, "delta": -1.0}, "delta must be a finite number > 0"),
    (DiveBatch, {"dataset_size": 10, "resize_every": 0}, "resize_every must be a positive integer"),
])
def test_bad_parameters_are_refused_with_a_reason(factory, params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        factory(**params)

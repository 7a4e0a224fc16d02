"""dbx.build_policy and dbx.AdaptiveBatchSize: the policies `dbx run` uses, driven from your own loop."""
import pytest
from distributions import install

import dbx
from dbx.policies.divebatch import DiveBatch
from dbx.registry import PluginError
from dbx.testing import diversity_estimate


def test_build_policy_builds_what_a_spec_names():
    policy = dbx.build_policy("divebatch", {"initial": 32, "max": 512, "delta": 0.1}, dataset_size=10_000)
    assert isinstance(policy, DiveBatch)
    assert (policy.initial, policy.max, policy.dataset_size) == (32, 512, 10_000)


def test_build_policy_reports_unknown_names_and_params_as_dbx_validate_does():
    with pytest.raises(PluginError, match="unknown policy 'divebach'.*Did you mean 'divebatch'"):
        dbx.build_policy("divebach", dataset_size=100)
    with pytest.raises(dbx.PolicyError, match="params.delt: unknown parameter 'delt'.*Did you mean 'delta'"):
        dbx.build_policy("divebatch", {"delt": 0.1}, dataset_size=100)
    with pytest.raises(dbx.PolicyError, match="params.initial: .*got '32'"):
        dbx.build_policy("divebatch", {"initial": "32"}, dataset_size=100)


def test_adaptive_batch_size_applies_divebatch_and_the_lr_rule():
    adaptive = dbx.AdaptiveBatchSize("divebatch", {"initial": 32, "max": 1024, "delta": 0.1, "resize_every": 2},
                                     dataset_size=10_000, lr_scaling="linear")
    assert adaptive.batch_size == 32
    assert not adaptive.measures_in(1) and adaptive.measures_in(2)
    first = adaptive.end_epoch(1, None)
    assert (first.batch_size, first.lr_factor, first.changed) == (32, 1.0, False)
    estimate = diversity_estimate(value=0.2, samples=10_000)  # 0.1 * 10_000 * 0.2 = 200
    second = adaptive.end_epoch(2, estimate)
    assert (second.old_batch_size, second.batch_size, second.changed) == (32, 200, True)
    assert second.lr_factor == pytest.approx(200 / 32) and adaptive.lr_scale == pytest.approx(200 / 32)
    assert adaptive.step == 313 + 313 and adaptive.samples_seen == 20_000


def test_adaptive_batch_size_resumes_where_it_stopped():
    params = {"initial": 16, "every": 1, "max": 256}
    first = dbx.AdaptiveBatchSize("adabatch", params, dataset_size=1000, lr_scaling="sqrt")
    for epoch in (1, 2):
        first.end_epoch(epoch, None)
    again = dbx.AdaptiveBatchSize("adabatch", params, dataset_size=1000, lr_scaling="sqrt")
    again.load_state_dict(first.state_dict())
    assert again.end_epoch(3, None) == first.end_epoch(3, None)
    assert again.batch_size == first.batch_size == 128


def test_a_plugin_policy_installed_from_a_distribution_is_driven_the_same_way(site):
    install(site, "dbx-halving", "[dbx.policies]\nhalving = halving_policy:Halving\n", {"halving_policy": """
        class Halving:
            uses_diversity = False
            def __init__(self, *, start: int = 64):
                self.start = start
            def initial_batch_size(self):
                return self.start
            def measures_in(self, epoch):
                return False
            def next_batch_size(self, state, diversity):
                return max(1, state.batch_size // 2)
            def state_dict(self):
                return {}
            def load_state_dict(self, state):
                pass
        """})
    adaptive = dbx.AdaptiveBatchSize("halving", {"start": 64}, dataset_size=100, lr_scaling="linear")
    change = adaptive.end_epoch(1, None)
    assert (change.batch_size, change.lr_factor) == (32, 0.5)


def test_a_policy_answering_something_that_is_not_a_batch_size_is_an_error():
    class Broken:
        uses_diversity = False

        def initial_batch_size(self):
            return 8

        def measures_in(self, epoch):
            return False

        def next_batch_size(self, state, diversity):
            return 12.5

    adaptive = dbx.AdaptiveBatchSize(Broken(), dataset_size=100)
    with pytest.raises(dbx.PolicyError, match="next_batch_size\\(\\) returned 12.5; a policy must return a positive int"):
        adaptive.end_epoch(1, None)
    with pytest.raises(dbx.PolicyError, match="lr_scaling='cubic'"):
        dbx.AdaptiveBatchSize(Broken(), dataset_size=100, lr_scaling="cubic")

"""The plugin registry, against real entry points: dbx's own and ones written by the tests.

A distribution is just a ``*.dist-info`` folder on ``sys.path`` with METADATA and
entry_points.txt, so the tests create real (tiny) distributions instead of faking importlib.
"""

import pytest
from distributions import install

from dbx import registry
from dbx.registry import PluginError


def test_builtins_are_found_through_entry_points():
    policies = registry.available("policy")
    assert {"fixed", "adabatch", "divebatch"} <= set(policies)
    assert policies["divebatch"].distribution == "dbx"
    assert "exact" in registry.available("estimator")


def test_unknown_name_lists_what_exists_with_a_did_you_mean():
    with pytest.raises(PluginError, match=r"unknown policy 'divebach'\. Did you mean 'divebatch'\?.*fixed \(dbx\)"):
        registry.info("policy", "divebach")


def test_a_third_party_plugin_is_a_peer_of_the_builtins(site):
    install(site, "my-policies", """
        [dbx.policies]
        halving = my_policies_mod:Halving
        """, {"my_policies_mod": """
        class Halving:
            uses_diversity = False
            def __init__(self, *, start: int = 64):
                self.start = start
        """})
    assert registry.info("policy", "halving").distribution == "my-policies"
    policy = registry.build("policy", "halving", {"start": 32}, dataset_size=100)
    assert policy.start == 32  # dataset_size was not passed: its signature does not name it


def test_a_plugin_that_fails_to_import_is_a_hard_error_naming_everything(site):
    install(site, "broken-plugin", """
        [dbx.models]
        broken = broken_plugin_mod:factory
        """, {"broken_plugin_mod": "import a_module_that_does_not_exist\n"})
    with pytest.raises(PluginError) as err:
        registry.load("model", "broken")
    message = str(err.value)
    for part in ("'broken'", "dbx.models", "broken_plugin_mod:factory", "broken-plugin 1.2.3", "a_module_that_does_not_exist"):
        assert part in message
    assert isinstance(err.value.__cause__, ModuleNotFoundError)


def test_two_distributions_registering_one_name_is_an_error_naming_both(site):
    install(site, "first-dist", "[dbx.policies]\nsame = first_mod:P\n")
    install(site, "second-dist", "[dbx.policies]\nsame = second_mod:P\n")
    with pytest.raises(PluginError, match=r"'same'.*first-dist 1\.2\.3.*second-dist 1\.2\.3"):
        registry.info("policy", "same")
    assert registry.info("policy", "divebatch").distribution == "dbx"  # the other names still work


def test_params_are_checked_against_the_factory_signature():
    problems = dict(registry.check_params("policy", "divebatch", {"delta": "big", "resize_evry": 5}))
    assert "valid number" in problems[("delta",)] or "float" in problems[("delta",)]
    assert "Did you mean 'resize_every'?" in problems[("resize_evry",)]
    assert registry.check_params("policy", "divebatch", {"delta": 0.1, "max": 1024}) == []


def test_injected_keywords_are_not_user_params():
    problems = dict(registry.check_params("policy", "divebatch", {"dataset_size": 10}))
    assert "set by dbx" in problems[("dataset_size",)]

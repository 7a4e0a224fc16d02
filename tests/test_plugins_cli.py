"""Plugin failures as a user meets them: `dbx plugins [--check]` reports every one, `dbx run` and
`dbx validate` refuse a spec that names a broken or ambiguous plugin, each with a clear message.

The broken packages are real distributions (a ``*.dist-info`` folder with METADATA and
entry_points.txt on sys.path), as in test_registry.py.
"""

from click.testing import CliRunner
from distributions import install

import dbx
from dbx import registry
from dbx.cli import main

SPEC = """\
name: tiny
seed: 0
device: cpu
data: {name: synthetic_logistic, params: {n: 600, d: 8}}
model: {name: logreg}
optimizer: {lr: 0.2}
epochs: 2
policy: {name: fixed}
"""


def install_two_broken_plugins(site):
    install(site, "broken-policy", "[dbx.policies]\nbroken = broken_policy_mod:Policy\n",
            {"broken_policy_mod": "import a_module_that_does_not_exist\n"})
    install(site, "broken-model", "[dbx.models]\nbadmodel = broken_model_mod:missing_factory\n",
            {"broken_model_mod": "def factory(**kw):\n    pass\n"})


def dbx_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_plugins_lists_without_a_subcommand_with_distribution_and_version():
    result = dbx_cli("plugins")
    assert result.exit_code == 0, result.output
    assert "divebatch" in result.output and dbx.__version__ in result.output and "provided by" in result.output


def test_check_reports_every_broken_plugin_without_stopping_at_the_first(site):
    install_two_broken_plugins(site)
    result = dbx_cli("plugins", "--check")
    assert result.exit_code == 1
    out = result.output
    assert "2 problem(s)" in out
    # each message in full: the plugin, its group and target, the distribution and version, the cause
    for part in ("policy plugin 'broken'", "dbx.policies", "broken_policy_mod:Policy", "broken-policy 1.2.3",
                 "ModuleNotFoundError", "a_module_that_does_not_exist",
                 "model plugin 'badmodel'", "broken_model_mod:missing_factory", "broken-model 1.2.3",
                 "AttributeError"):
        assert part in out, part
    assert "FAILED [1]" in out and "FAILED [2]" in out
    # the healthy plugins were still loaded and reported
    assert out.count(" ok ") >= len(registry.available("policy")) - 1


def test_run_and_validate_refuse_a_spec_naming_a_broken_plugin(site):
    install_two_broken_plugins(site)
    spec = site.parent / "spec.yaml"
    spec.write_text(SPEC.replace("name: fixed", "name: broken"))
    for command in ("validate", "run"):
        result = dbx_cli(command, str(spec))
        assert result.exit_code == 2, result.output
        assert f"{spec}:8: policy.name: policy plugin 'broken'" in result.output
        assert "from broken-policy 1.2.3) failed to load: ModuleNotFoundError" in result.output
        assert "Traceback" not in result.output
    assert not (site.parent / "mlflow.db").exists()


def test_two_distributions_with_one_name_are_reported_by_check_and_refused_by_run(site):
    install(site, "first-dist", "[dbx.models]\nlogreg2 = first_mod:m\n")
    install(site, "second-dist", "[dbx.models]\nlogreg2 = second_mod:m\n")
    message = ("plugin name 'logreg2' in group dbx.models is registered by first-dist 1.2.3 (first_mod:m) "
               "and by second-dist 1.2.3 (second_mod:m)")

    for args in (["plugins"], ["plugins", "--check"]):
        result = dbx_cli(*args)
        assert result.exit_code == 1
        assert f"error: {message}; uninstall one of them" in result.output
    assert "blocked (name conflict)" in dbx_cli("plugins", "--check").output

    spec = site.parent / "spec.yaml"
    spec.write_text(SPEC.replace("name: logreg", "name: logreg2"))
    result = dbx_cli("run", str(spec))
    assert result.exit_code == 2
    assert f"{spec}:5: model.name: {message}" in result.output
    assert not (site.parent / "mlflow.db").exists()

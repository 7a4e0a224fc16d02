"""A plugin whose signature cannot serve as its parameter schema (an untyped or positional
parameter, ``*args``) is reported where a user and a plugin author look: a warning from
``dbx validate`` and ``dbx run`` naming the plugin and its distribution (an error with
``--strict``), and a FAILED row in ``dbx plugins --check``; the same words as ``dbx.testing``."""
import pytest
from click.testing import CliRunner
from distributions import install

from dbx import registry
from dbx.cli import main
from dbx.registry import signature_problems

SLOPPY = '''
class Untyped:
    uses_diversity = False

    def __init__(self, *, batch_size=16):
        self.batch_size = batch_size

    def initial_batch_size(self):
        return self.batch_size

    def measures_in(self, epoch):
        return False

    def next_batch_size(self, state, diversity):
        return state.batch_size

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class Positional(Untyped):
    def __init__(self, batch_size: int = 16, *args: int):
        super().__init__(batch_size=batch_size)
'''

SPEC = """\
name: sloppy
device: cpu
data: {name: synthetic_logistic, params: {n: 200, d: 4}}
model: {name: logreg}
optimizer: {lr: 0.1}
epochs: 1
policy: {name: POLICY, params: {batch_size: 20}}
tracking: {system_metrics: false}
"""


@pytest.fixture
def sloppy(site):
    install(site, "sloppy-policies", "[dbx.policies]\nuntyped = sloppy_mod:Untyped\npositional = sloppy_mod:Positional\n",
            {"sloppy_mod": SLOPPY})
    registry.refresh()


def spec(tmp_path, policy):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.replace("POLICY", policy))
    return path


def test_the_signature_rules_in_the_registry(sloppy):
    assert signature_problems("policy", registry.load("policy", "untyped")) == [
        "parameter 'batch_size' has no type hint; dbx validates spec params against the hints (e.g. batch_size: int = ...)"]
    problems = signature_problems("policy", registry.load("policy", "positional"))
    assert problems[0].startswith("parameter 'batch_size' is not keyword-only; put a bare * before the parameters")
    assert problems[1] == "it takes *args; dbx passes keywords only: remove it"
    assert signature_problems("policy", registry.load("policy", "divebatch")) == []


@pytest.mark.parametrize("policy, fragment", [("untyped", "parameter 'batch_size' has no type hint"),
                                              ("positional", "'batch_size' is not keyword-only")])
def test_validate_warns_naming_the_plugin_and_fails_with_strict(sloppy, tmp_path, policy, fragment):
    path = spec(tmp_path, policy)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"spec.yaml:7: policy.name: warning: policy '{policy}' (from sloppy-policies 1.2.3) has a signature " \
           f"dbx cannot check params against: " in result.output
    assert fragment in result.output and "dbx.testing.check_policy reports the same" in result.output
    assert f"ok  {path} (1 warning(s))" in result.output

    strict = CliRunner().invoke(main, ["validate", "--strict", str(path)])
    assert strict.exit_code == 2 and fragment in strict.output and "1 of 1 spec(s) have problems" in strict.output


def test_a_run_with_such_a_plugin_says_so_before_it_starts(sloppy, tmp_path):
    result = CliRunner().invoke(main, ["run", str(spec(tmp_path, "untyped")), "--tracking-uri",
                                       f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "warning: policy 'untyped' (from sloppy-policies 1.2.3)" in lines[0]


def test_well_typed_plugins_give_no_warning(tmp_path):
    path = spec(tmp_path, "fixed")
    result = CliRunner().invoke(main, ["validate", "--strict", str(path)])
    assert result.exit_code == 0 and result.output.strip() == f"ok  {path}"


def test_plugins_check_fails_such_a_plugin_with_its_distribution(sloppy):
    result = CliRunner().invoke(main, ["plugins", "--check"])
    assert result.exit_code == 1
    assert "2 problem(s)" in result.output
    for name in ("untyped", "positional"):
        assert (f"policy plugin '{name}' (group dbx.policies, target sloppy_mod:{name.capitalize()}, from "
                f"sloppy-policies 1.2.3) has a signature dbx cannot check spec params against") in result.output

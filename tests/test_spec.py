"""The spec: what a valid one looks like, and what the user is told when one is wrong."""
from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbx.errors import UserError
from dbx.spec import (
    Problem,
    Spec,
    SpecError,
    apply_overrides,
    expand_sweep,
    load_spec,
    parse_spec,
    spec_from_dict,
)

# The example spec from the design notes, verbatim.
DESIGN_EXAMPLE = """\
name: cifar10-divebatch
seed: 0
device: auto               # auto | cpu | cuda | cuda:1
data:   {name: cifar10, root: ~/data, params: {augment: true}}
model:  {name: resnet18_cifar, params: {num_classes: 10}}
optimizer: {lr: 0.1, momentum: 0.9, weight_decay: 5e-4}
epochs: 100
policy: {name: divebatch, params: {initial: 128, max: 2048, delta: 0.1, resize_every: 20}}
estimator: {name: exact}
lr_scaling: linear         # linear | sqrt | none
target_accuracy: 0.90      # for time-to-target
tracking: {uri: null, experiment: null}   # null -> MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
sweep: {policy.name: [fixed, adabatch, divebatch], seed: [0, 1, 2]}   # optional
"""

# The smallest valid spec, one key per line so tests can name lines.
MINIMAL = """\
name: tiny
data:
  name: synthetic_logistic
model:
  name: logreg
optimizer:
  lr: 0.5
epochs: 3
policy:
  name: fixed
  params:
    batch_size: 32
"""
MINIMAL_DICT = {
    "name": "tiny",
    "data": {"name": "synthetic_logistic"},
    "model": {"name": "logreg"},
    "optimizer": {"lr": 0.5},
    "epochs": 3,
    "policy": {"name": "fixed", "params": {"batch_size": 32}},
}


def write(tmp_path, text: str, name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems_of(text: str, overrides=(), source: str = "x.yaml") -> list[Problem]:
    with pytest.raises(SpecError) as caught:
        parse_spec(textwrap.dedent(text), source=source, overrides=overrides)
    return caught.value.problems


def only_problem(text: str, overrides=()) -> Problem:
    problems = problems_of(text, overrides)
    assert len(problems) == 1, problems
    return problems[0]


# ---------------------------------------------------------------------------------- valid specs


def test_design_example_loads_with_the_right_types(tmp_path):
    spec = load_spec(write(tmp_path, DESIGN_EXAMPLE))
    assert spec.name == "cifar10-divebatch"
    assert spec.optimizer.weight_decay == 0.0005 and type(spec.optimizer.weight_decay) is float
    assert spec.optimizer.lr == 0.1 and spec.optimizer.momentum == 0.9
    assert spec.data.root == "~/data" and spec.data.params == {"augment": True}
    assert spec.model.params == {"num_classes": 10}
    assert spec.policy.params == {"initial": 128, "max": 2048, "delta": 0.1, "resize_every": 20}
    assert spec.estimator.name == "exact" and spec.estimator.params == {}
    assert spec.lr_scaling == "linear"
    assert spec.target_accuracy == 0.9
    assert spec.sweep == {"policy.name": ["fixed", "adabatch", "divebatch"], "seed": [0, 1, 2]}
    assert spec.source_text == DESIGN_EXAMPLE
    assert spec.source_path == str(tmp_path / "spec.yaml")


def test_defaults_are_filled_in():
    spec = parse_spec(MINIMAL)
    assert spec.seed == 0 and spec.device == "auto"
    assert spec.data.root is None and spec.data.subset is None and spec.data.params == {}
    assert (spec.optimizer.momentum, spec.optimizer.weight_decay, spec.optimizer.nesterov) == (0.9, 0.0, False)
    assert spec.schedule.name == "constant" and spec.schedule.milestones == []
    assert spec.schedule.gamma == 0.1 and spec.schedule.warmup_epochs == 0 and spec.schedule.min_lr == 0.0
    assert spec.estimator.name == "exact" and spec.estimator.params == {}
    assert spec.lr_scaling == "none" and spec.target_accuracy is None
    assert spec.max_micro_batch is None and spec.eval_batch_size == 1024
    assert spec.tracking.uri is None and spec.tracking.experiment is None and spec.tracking.system_metrics
    assert spec.sweep is None


def test_spec_from_dict_matches_the_same_yaml():
    from_dict = spec_from_dict(MINIMAL_DICT)
    assert from_dict == parse_spec(MINIMAL)
    assert from_dict.source_text == "" and from_dict.source_path is None
    assert from_dict.where("optimizer.lr") == "<spec>"


@pytest.mark.parametrize(
    "text, value",
    [("5e-4", 0.0005), ("1e3", 1000.0), ("1E-5", 1e-5), (".5e2", 50.0), ("-2e-3", -0.002),
     ("1.5", 1.5), ("1.0e+2", 100.0), (".inf", math.inf), ("-.inf", -math.inf)],
)
def test_exponent_floats_are_floats_not_strings(text, value):
    spec = parse_spec(MINIMAL, overrides=[f"policy.params.x={text}"])
    assert spec.policy.params["x"] == value and type(spec.policy.params["x"]) is float


@pytest.mark.parametrize("text, value", [("12", 12), ("1_000", 1000), ("0x10", 16), ("-3", -3)])
def test_ints_stay_ints(text, value):
    spec = parse_spec(MINIMAL, overrides=[f"policy.params.x={text}"])
    assert spec.policy.params["x"] == value and type(spec.policy.params["x"]) is int


def test_nan_and_plain_strings_keep_their_yaml_meaning():
    sets = ["policy.params.x=.nan", "policy.params.y=e5", "policy.params.z=2024-01-01"]
    params = parse_spec(MINIMAL, overrides=sets).policy.params
    assert math.isnan(params["x"])
    assert params["y"] == "e5"
    assert params["z"] == "2024-01-01"  # no dates in a spec: a string, as written


def test_int_is_accepted_where_a_float_is_expected():
    spec = parse_spec(MINIMAL.replace("lr: 0.5", "lr: 1"))
    assert spec.optimizer.lr == 1.0 and type(spec.optimizer.lr) is float


def test_a_utf8_bom_is_tolerated(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_spec(path).name == "tiny"


# ---------------------------------------------------------------------------------- YAML traps


def test_duplicate_keys_are_rejected_with_both_lines():
    problem = only_problem("""\
        name: tiny
        data: {name: d}
        model: {name: m}
        optimizer:
          lr: 0.1
          momentum: 0.5
          lr: 0.2
        epochs: 3
        policy: {name: fixed}
    """)
    assert problem == Problem("x.yaml:7", "optimizer.lr", "duplicate key 'lr' (first at line 5)")
    assert str(problem) == "x.yaml:7: optimizer.lr: duplicate key 'lr' (first at line 5)"


def test_duplicate_top_level_key_and_schema_problems_are_reported_together():
    problems = problems_of(MINIMAL + "epochs: 0\n")
    assert [(p.where, p.message) for p in problems] == [
        ("x.yaml:13", "duplicate key 'epochs' (first at line 8)"),
        ("x.yaml:13", "must be > 0, got 0"),
    ]


def test_a_merge_key_overridden_in_place_is_not_a_duplicate():
    spec = parse_spec(MINIMAL + textwrap.dedent("""\
        schedule: &steps {name: step, step_size: 10, gamma: 0.5}
        sweep:
          schedule:
            - *steps
            - {<<: *steps, step_size: 20}
    """))
    assert spec.sweep == {"schedule": [{"name": "step", "step_size": 10, "gamma": 0.5},
                                       {"name": "step", "step_size": 20, "gamma": 0.5}]}


@pytest.mark.parametrize(
    "text, line, column, what",
    [
        ("name: a\nepochs: 3\ndata:\n  name: x\n   oops: 1\n", 5, 8, "mapping values are not allowed here"),
        ("name: a\noptimizer: {lr: 0.1\n", 3, 1, "expected ',' or '}'"),
        ("name: [a, b\n", 2, 1, "expected ',' or ']'"),
        ("name: 'unterminated\n", 2, 1, "found unexpected end of stream"),
    ],
)
def test_malformed_yaml_reports_line_and_column(tmp_path, text, line, column, what):
    path = write(tmp_path, text, "x.yaml")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    (problem,) = caught.value.problems
    assert problem.where == f"{path}:{line}"
    assert problem.message.startswith(f"invalid YAML at line {line}, column {column}: ")
    assert what in problem.message


def test_mapping_values_message_matches_the_documented_form():
    problem = only_problem("name: a\nepochs: 3\nmodel:\n  name: x: y\n")
    assert str(problem) == "x.yaml:4: invalid YAML at line 4, column 10: mapping values are not allowed here"


@pytest.mark.parametrize(
    "text, got", [("", "an empty document"), ("# only a comment\n", "an empty document"),
                  ("- a\n- b\n", "['a', 'b'] (list)"), ("42\n", "42 (int)")],
)
def test_a_document_that_is_not_a_mapping_is_one_clear_problem(text, got):
    problem = only_problem(text)
    assert problem.where == "x.yaml" and problem.key == ""
    assert problem.message == f"a spec must be a mapping of keys (name:, data:, model:, ...), got {got}"


@pytest.mark.parametrize(
    "value", ["!!python/object:os.system {}", "!!python/object/apply:os.system ['echo hi']",
              "!!python/name:os.system", "!!binary aGk=", "!!set {a, b}", "!!timestamp 2020-01-01", "!custom 3"],
)
def test_tags_beyond_plain_data_are_rejected(value):
    problem = only_problem(MINIMAL + f"estimator:\n  name: exact\n  params:\n    x: {value}\n")
    assert problem.where == "x.yaml:16" and problem.key == "estimator.params.x"
    assert "unsupported YAML tag" in problem.message


@pytest.mark.parametrize("value, message", [("!!bool maybe", "cannot read 'maybe' as !!bool"),
                                            ("!!int ten", "cannot read 'ten' as !!int")])
def test_explicit_tags_on_unreadable_values(value, message):
    problem = only_problem(MINIMAL + f"seed: {value}\n")
    assert (problem.where, problem.key, problem.message) == ("x.yaml:13", "seed", message)


def test_a_control_character_is_located():
    problem = only_problem(MINIMAL + "seed: 1\x07\n")
    assert problem.where == "x.yaml:13"
    assert problem.message == (
        "invalid YAML at line 13, column 8: unacceptable character #x0007: special characters are not allowed"
    )


def test_a_multi_document_stream_is_rejected():
    problem = only_problem(MINIMAL + "---\nname: other\n")
    assert "expected a single document" in problem.message


def test_recursive_alias_is_a_problem_not_a_hang():
    problem = only_problem(MINIMAL + "estimator: {name: exact, params: {loop: &l [*l]}}\n")
    assert "recursive YAML alias" in problem.message


# ---------------------------------------------------------------------------------- schema problems


def test_unknown_key_suggests_the_close_one_at_its_line(tmp_path):
    path = write(tmp_path, MINIMAL.replace("epochs: 3", "epocs: 3"))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    problems = caught.value.problems
    assert problems[0] == Problem(f"{path}:8", "epocs", "unknown key 'epocs'. Did you mean 'epochs'?")
    assert problems[1].key == "epochs" and problems[1].message.startswith("missing required key 'epochs'")
    assert problems[1].where == path  # no line to point at
    assert str(caught.value).splitlines()[0] == f"{path}:8: epocs: unknown key 'epocs'. Did you mean 'epochs'?"


def test_nested_unknown_key_without_a_close_match_lists_the_valid_keys():
    problem = only_problem(MINIMAL.replace("  name: synthetic_logistic", "  name: synthetic_logistic\n  zzz: 1"))
    assert problem.where == "x.yaml:4" and problem.key == "data.zzz"
    assert problem.message == "unknown key 'zzz'. Valid keys: name, params, root, subset."


def test_an_unknown_optimizer_key_says_that_settings_go_in_params():
    problem = only_problem(MINIMAL.replace("  lr: 0.5", "  lr: 0.5\n  zzz: 1"))
    assert problem.where == "x.yaml:8" and problem.key == "optimizer.zzz"
    assert problem.message.startswith("unknown key 'zzz'. The optimizer's own settings go in optimizer.params")


def test_spec_error_is_a_user_error_with_one_problem_per_line():
    with pytest.raises(UserError) as caught:
        parse_spec(MINIMAL.replace("epochs: 3", "epochs: ten").replace("lr: 0.5", "lr: -1"), source="x.yaml")
    assert caught.value.exit_code == 2
    assert str(caught.value).splitlines() == [
        "x.yaml:7: optimizer.lr: must be > 0, got -1",
        "x.yaml:8: epochs: expected an integer, got 'ten' (str)",
    ]


@pytest.mark.parametrize(
    "line, replacement, key, message",
    [
        ("epochs: 3", "epochs: ten", "epochs", "expected an integer, got 'ten' (str)"),
        ("epochs: 3", "epochs: true", "epochs", "expected an integer, got true (bool)"),
        ("epochs: 3", "epochs: 2.5", "epochs", "expected an integer, got 2.5 (float)"),
        ("  lr: 0.5", "  lr: yes", "optimizer.lr", "expected a number, got true (bool)"),
        ("  lr: 0.5", "  lr: '0.1'", "optimizer.lr", "expected a number, got '0.1' (str)"),
        ("name: tiny", "name: 123", "name", "expected a string, got 123 (int); put it in quotes to make it a string"),
        ("  params:", "  params: [1]\n  x:", "policy.params", "expected a mapping, got [1] (list)"),
    ],
)
def test_wrong_types_are_named_at_their_line(line, replacement, key, message):
    text = MINIMAL.replace(line, replacement)
    problems = problems_of(text)
    assert problems[0].key == key and problems[0].message == message
    expected_line = next(i for i, l in enumerate(text.splitlines(), 1) if l.strip().startswith(key.split(".")[-1] + ":"))
    assert problems[0].where == f"x.yaml:{expected_line}"


def test_a_plugin_given_as_a_bare_name_says_how_to_write_it():
    problem = only_problem(MINIMAL + "estimator: exact\n")
    assert problem.message == "expected a mapping, got 'exact' (str); write {name: exact}"


def test_spec_error_keeps_the_data_as_read_for_further_checks():
    with pytest.raises(SpecError) as caught:
        parse_spec(MINIMAL.replace("epochs: 3", "epochs: 0"), source="x.yaml", overrides=["policy.params.extra=1"])
    assert caught.value.data["epochs"] == 0 and caught.value.data["policy"]["params"]["extra"] == 1
    assert caught.value.where(("policy", "params", "batch_size")) == "x.yaml:12"
    assert caught.value.where(("policy", "params", "extra")) == "--set policy.params.extra=1"


def test_several_problems_are_reported_at_once_in_file_order(tmp_path):
    path = write(tmp_path, """\
        name: tiny
        data: {name: synthetic_logistic}
        model: {name: logreg}
        optimizer:
          lr: 0.1
          momentum: 1.5
        epochs: many
        policy: {name: fixed}
        eval_batch_sise: 64
    """)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:6: optimizer.momentum: must be < 1, got 1.5",
        f"{path}:7: epochs: expected an integer, got 'many' (str)",
        f"{path}:9: eval_batch_sise: unknown key 'eval_batch_sise'. Did you mean 'eval_batch_size'?",
    ]


@pytest.mark.parametrize(
    "override, key, message",
    [
        ("epochs=0", "epochs", "must be > 0, got 0"),
        ("eval_batch_size=-8", "eval_batch_size", "must be > 0, got -8"),
        ("max_micro_batch=0", "max_micro_batch", "must be > 0, got 0"),
        ("data.subset=0", "data.subset", "must be > 0, got 0"),
        ("seed=-1", "seed", "must be >= 0, got -1"),
        ("optimizer.lr=0", "optimizer.lr", "must be > 0, got 0"),
        ("optimizer.lr=-1e-3", "optimizer.lr", "must be > 0, got -0.001"),
        ("optimizer.lr=.inf", "optimizer.lr", "must be a finite number, got inf"),
        ("optimizer.momentum=1.0", "optimizer.momentum", "must be < 1, got 1.0"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay", "must be >= 0, got -1"),
        ("target_accuracy=1.5", "target_accuracy", "must be <= 1, got 1.5"),
        ("target_accuracy=-0.1", "target_accuracy", "must be >= 0, got -0.1"),
        ("schedule.gamma=0", "schedule.gamma", "must be > 0, got 0"),
        ("schedule.gamma=1.5", "schedule.gamma", "must be <= 1, got 1.5"),
        ("schedule.t_max=0", "schedule.t_max", "must be > 0, got 0"),
        ("schedule.warmup_epochs=-1", "schedule.warmup_epochs", "must be >= 0, got -1"),
        ("schedule.min_lr=-1", "schedule.min_lr", "must be >= 0, got -1"),
        ("name=my run", "name", "'my run' is not allowed here: use letters, digits, '_', '.' and '-' only"),
        ("device=gpu", "device", "'gpu' is not allowed here: use auto, cpu, cuda or cuda:N (e.g. cuda:1)"),
        ("lr_scaling=lineer", "lr_scaling", "must be one of none, linear, sqrt, auto; got 'lineer' (str). Did you mean 'linear'?"),
        ("schedule.name=cosin", "schedule.name",
         "must be one of constant, cosine, linear, onecycle, multistep, step; got 'cosin' (str). Did you mean 'cosine'?"),
        ("policy.name=''", "policy.name", "must not be empty"),
    ],
)
def test_each_range_rule(override, key, message):
    problem = only_problem(MINIMAL, [override])
    assert (problem.where, problem.key, problem.message) == (f"--set {override}", key, message)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_valid_devices(device):
    assert parse_spec(MINIMAL, overrides=[f"device={device}"]).device == device


def test_multistep_needs_milestones():
    problem = only_problem(MINIMAL + "schedule:\n  name: multistep\n")
    assert problem.where == "x.yaml:13" and problem.key == "schedule.milestones"
    assert problem.message == "schedule 'multistep' needs milestones, e.g. milestones: [30, 60, 90]"


def test_milestones_must_increase_and_be_positive():
    problem = only_problem(MINIMAL + "schedule:\n  name: multistep\n  milestones: [30, 20]\n")
    assert problem.where == "x.yaml:15" and "strictly increasing" in problem.message
    problem = only_problem(MINIMAL + "schedule:\n  name: multistep\n  milestones:\n    - 30\n    - 0\n")
    assert (problem.where, problem.key, problem.message) == ("x.yaml:17", "schedule.milestones.1", "must be > 0, got 0")
    spec = parse_spec(MINIMAL + "schedule: {name: multistep, milestones: [30, 60], gamma: 0.2}\n")
    assert spec.schedule.milestones == [30, 60]


def test_step_schedule_needs_step_size():
    problem = only_problem(MINIMAL + "schedule: {name: step}\n")
    assert problem.key == "schedule.step_size" and "needs step_size" in problem.message
    assert parse_spec(MINIMAL + "schedule: {name: step, step_size: 10}\n").schedule.step_size == 10


def test_nesterov_needs_momentum():
    problem = only_problem(MINIMAL.replace("  lr: 0.5", "  lr: 0.5\n  momentum: 0\n  nesterov: true"))
    assert (problem.where, problem.key) == ("x.yaml:9", "optimizer.nesterov")
    assert problem.message == "nesterov: true needs momentum > 0; set momentum (e.g. 0.9) or nesterov: false"
    assert parse_spec(MINIMAL, overrides=["optimizer.nesterov=true"]).optimizer.nesterov is True


def test_missing_required_key_in_a_block_points_at_the_block():
    problem = only_problem(MINIMAL.replace("  name: logreg", "  params: {}"))
    assert (problem.where, problem.key) == ("x.yaml:4", "model.name")
    assert problem.message.startswith("missing required key 'name'")


# ---------------------------------------------------------------------------------- --set


def test_set_values_are_read_as_yaml():
    spec = parse_spec(MINIMAL, overrides=[
        "epochs=7", "optimizer.weight_decay=5e-4", "optimizer.nesterov=true",
        "schedule.name=multistep", "schedule.milestones=[2, 4]", "target_accuracy=0.5",
        "data.root=null", "max_micro_batch=64",
    ])
    assert spec.epochs == 7
    assert spec.optimizer.weight_decay == 0.0005 and spec.optimizer.nesterov is True
    assert spec.schedule.milestones == [2, 4]
    assert spec.target_accuracy == 0.5 and spec.data.root is None and spec.max_micro_batch == 64


def test_set_creates_a_block_the_file_leaves_out():
    spec = parse_spec(MINIMAL, overrides=["schedule.name=cosine", "schedule.t_max=10", "tracking.uri=sqlite:///m.db"])
    assert spec.schedule.name == "cosine" and spec.schedule.t_max == 10
    assert spec.tracking.uri == "sqlite:///m.db"
    assert spec.where("schedule.t_max") == "--set schedule.t_max=10"


def test_set_may_add_new_keys_inside_params_only():
    spec = parse_spec(MINIMAL, overrides=["policy.params.delta=0.1", "model.params.hidden=[64, 64]",
                                          "data.params.noise.level=0.5"])
    assert spec.policy.params == {"batch_size": 32, "delta": 0.1}
    assert spec.model.params == {"hidden": [64, 64]}
    assert spec.data.params == {"noise": {"level": 0.5}}


def test_set_replaces_a_whole_block():
    spec = parse_spec(MINIMAL, overrides=["policy={name: divebatch, params: {initial: 8}}"])
    assert spec.policy.name == "divebatch" and spec.policy.params == {"initial": 8}


def test_set_with_an_unknown_key_suggests_the_close_one():
    problem = only_problem(MINIMAL, ["epocs=3"])
    assert problem == Problem("--set epocs=3", "epocs", "no such key 'epocs' in the spec. Did you mean 'epochs'?")
    problem = only_problem(MINIMAL, ["optimizer.lrr=0.1"])
    assert problem.message == "no such key 'lrr' in 'optimizer'. Did you mean 'lr'?"
    problem = only_problem(MINIMAL, ["epochs.x=1"])
    assert problem.message == "'epochs' is a single value; it has no key 'x'"


def test_set_with_a_value_of_the_wrong_type_is_blamed_on_the_override():
    problem = only_problem(MINIMAL, ["policy.params.batch_size=1", "epochs=abc"])
    assert problem == Problem("--set epochs=abc", "epochs", "expected an integer, got 'abc' (str)")
    problem = only_problem(MINIMAL, ["optimizer={lr: -1}"])
    assert (problem.where, problem.key) == ("--set optimizer={lr: -1}", "optimizer.lr")


def test_set_without_equals_or_key_or_with_bad_yaml():
    assert only_problem(MINIMAL, ["epochs"]).message == "expected KEY=VALUE, e.g. --set optimizer.lr=0.05"
    assert "not a key path" in only_problem(MINIMAL, ["=3"]).message
    assert "not a key path" in only_problem(MINIMAL, ["optimizer..lr=3"]).message
    problem = only_problem(MINIMAL, ["schedule.milestones=[1, 2"])
    assert problem.message.startswith("cannot read the value '[1, 2': invalid YAML")
    assert "unsupported YAML tag" in only_problem(MINIMAL, ["epochs=!!python/object:os.system {}"]).message


def test_set_through_a_value_that_is_not_a_mapping():
    text = MINIMAL + "estimator: {name: exact, params: {window: 3}}\n"
    problem = only_problem(text, ["estimator.params.window.size=2"])
    assert problem.message == (
        "'estimator.params.window' is 3 (int), not a mapping; set it whole, e.g. estimator.params.window={...}"
    )


def test_set_reports_every_problem_with_file_problems_first():
    problems = problems_of(MINIMAL.replace("epochs: 3", "epochs: 0"), ["epocs=1", "seed=x"])
    assert [p.where for p in problems] == ["x.yaml:8", "--set epocs=1", "--set seed=x"]


def test_apply_overrides_leaves_its_input_alone():
    data = {"optimizer": {"lr": 0.1}, "policy": {"name": "fixed", "params": {"batch_size": 8}}}
    new, problems = apply_overrides(data, ["optimizer.lr=0.2", "policy.params.batch_size=16", "bogus=1"])
    assert new["optimizer"] == {"lr": 0.2} and new["policy"]["params"] == {"batch_size": 16}
    assert data == {"optimizer": {"lr": 0.1}, "policy": {"name": "fixed", "params": {"batch_size": 8}}}
    assert [p.key for p in problems] == ["bogus"]


def test_set_sweep_keys_keep_their_dots():
    spec = parse_spec(MINIMAL, overrides=["sweep.policy.params.batch_size=[8, 16]", "sweep.seed=[0, 1]"])
    assert spec.sweep == {"policy.params.batch_size": [8, 16], "seed": [0, 1]}
    assert parse_spec(DESIGN_EXAMPLE, overrides=["sweep=null"]).sweep is None


# ---------------------------------------------------------------------------------- sweeps


def test_sweep_expands_the_grid_in_written_order(tmp_path):
    path = write(tmp_path, DESIGN_EXAMPLE)
    points = expand_sweep(load_spec(path))
    assert [label for label, _ in points] == [
        f"policy.name={p},seed={s}" for p in ("fixed", "adabatch", "divebatch") for s in (0, 1, 2)
    ]
    label, point = points[4]
    assert (point.policy.name, point.seed, point.sweep) == ("adabatch", 1, None)
    assert point.policy.params["delta"] == 0.1  # the rest of the spec is kept
    assert point.where("seed") == f"{path}:13"  # the sweep set it
    assert point.where("optimizer.lr") == f"{path}:6"
    assert point.source_text == DESIGN_EXAMPLE


def test_no_sweep_is_one_point_with_an_empty_label():
    spec = parse_spec(MINIMAL)
    assert expand_sweep(spec) == [("", spec)]


def test_sweep_into_plugin_params_and_over_blocks():
    sweep = "sweep:\n  policy.params.batch_size: [8, 16]\n  optimizer: [{lr: 0.1}, {lr: 0.2, momentum: 0}]\n"
    spec = parse_spec(MINIMAL + sweep)
    points = expand_sweep(spec)
    assert [label for label, _ in points] == [
        'policy.params.batch_size=8,optimizer={"lr": 0.1}',
        'policy.params.batch_size=8,optimizer={"lr": 0.2, "momentum": 0}',
        'policy.params.batch_size=16,optimizer={"lr": 0.1}',
        'policy.params.batch_size=16,optimizer={"lr": 0.2, "momentum": 0}',
    ]
    assert points[3][1].policy.params["batch_size"] == 16 and points[3][1].optimizer.momentum == 0


def test_a_bad_sweep_key_is_named_at_its_line():
    problems = problems_of(MINIMAL + "sweep:\n  seed: [0, 1]\n  optimizer.lrr: [0.1]\n")
    message = "no such key 'lrr' in 'optimizer'. Did you mean 'lr'?"
    assert problems == [Problem("x.yaml:15", "sweep.optimizer.lrr", message)]


def test_a_bad_sweep_value_is_named_at_the_sweep_key_line():
    spec = parse_spec(MINIMAL + "sweep:\n  seed: [0, 1]\n  epochs: [5, 0, -1]\n", source="x.yaml")
    with pytest.raises(SpecError) as caught:
        expand_sweep(spec)
    assert [str(p) for p in caught.value.problems] == [
        "x.yaml:15: epochs: must be > 0, got 0 (sweep point seed=0,epochs=0)",
        "x.yaml:15: epochs: must be > 0, got -1 (sweep point seed=0,epochs=-1)",
    ]


def test_keys_joined_by_plus_vary_together():
    sweep = ("sweep:\n  seed: [0, 1]\n  policy+lr_scaling:\n    - [{name: fixed, params: {batch_size: 32}}, none]\n"
             "    - [{name: divebatch}, linear]\n")
    points = expand_sweep(parse_spec(MINIMAL + sweep, source="x.yaml"))
    assert [(p.seed, p.policy.name, p.lr_scaling) for _, p in points] == [
        (0, "fixed", "none"), (0, "divebatch", "linear"), (1, "fixed", "none"), (1, "divebatch", "linear")]
    assert points[1][1].where("lr_scaling") == "x.yaml:15"  # the joint key's line


def test_a_joint_key_needs_one_value_per_key_and_real_keys():
    spec = parse_spec(MINIMAL + "sweep:\n  policy.name+lr_scaling: [[fixed, none], [divebatch]]\n", source="x.yaml")
    with pytest.raises(SpecError) as caught:
        expand_sweep(spec)
    [problem] = caught.value.problems
    assert (problem.where, problem.key) == ("x.yaml:14", "sweep.policy.name+lr_scaling")
    assert "a list of 2 values, one per key (policy.name, lr_scaling), got [\"divebatch\"]" in problem.message
    problem = only_problem(MINIMAL + "sweep:\n  policy.name+lr_scalin: [[fixed, none]]\n")
    assert problem.key == "sweep.policy.name+lr_scalin" and "Did you mean 'lr_scaling'?" in problem.message


def test_a_sweep_needs_values():
    problem = only_problem(MINIMAL + "sweep: {seed: []}\n")
    assert (problem.where, problem.key) == ("x.yaml:13", "sweep.seed")
    assert "at least one value" in problem.message
    assert "expected a list" in only_problem(MINIMAL + "sweep: {seed: 3}\n").message


# ---------------------------------------------------------------------------------- output


def test_to_dict_and_resolved_yaml_round_trip():
    spec = parse_spec(DESIGN_EXAMPLE)
    resolved = spec.to_dict()
    assert resolved["optimizer"] == {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0005,
                                     "nesterov": False, "params": {}}
    assert resolved["schedule"]["name"] == "constant" and resolved["eval_batch_size"] == 1024
    assert parse_spec(spec.resolved_yaml()) == spec
    assert yaml.safe_load(spec.resolved_yaml()) == resolved


def test_flat_params_are_dotted_strings():
    flat = parse_spec(DESIGN_EXAMPLE).flat_params()
    assert flat["optimizer.lr"] == "0.1"
    assert flat["optimizer.weight_decay"] == "0.0005"
    assert flat["policy.params.max"] == "2048"
    assert flat["data.params.augment"] == "true"
    assert flat["data.root"] == "~/data" and flat["tracking.uri"] == "null"
    assert flat["schedule.milestones"] == "[]"
    assert flat["estimator.params"] == "{}"
    assert flat["sweep.seed"] == "[0, 1, 2]"
    assert all(isinstance(v, str) for v in flat.values())


def test_where_points_at_the_deepest_key_the_file_has():
    spec = parse_spec(MINIMAL, source="x.yaml", overrides=["model.params.depth=2"])
    assert spec.where("optimizer.lr") == "x.yaml:7"
    assert spec.where(("optimizer", "momentum")) == "x.yaml:6"  # not written: its block
    assert spec.where("policy.params.batch_size") == "x.yaml:12"
    assert spec.where("model.params.depth") == "--set model.params.depth=2"
    assert spec.where("schedule.name") == "x.yaml"  # nothing on that path in the file
    assert spec.where("") == "x.yaml"


def test_load_spec_on_a_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as caught:
        load_spec(missing)
    assert caught.value.problems == [Problem(str(missing), "", f"spec file not found: {missing}")]
    assert str(caught.value) == f"{missing}: spec file not found: {missing}"


def test_load_spec_on_a_directory(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(tmp_path)


def test_spec_does_not_import_torch_or_mlflow():
    import subprocess

    code = "import sys, dbx.spec; print('torch' in sys.modules, 'mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_every_field_is_documented():
    from pydantic import BaseModel

    def models(model):
        yield model
        for info in model.model_fields.values():
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                yield from models(info.annotation)

    for model in models(Spec):
        assert model.__doc__
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"


# ---------------------------------------------------------------------------------- never crash

FIELD_NAMES = ["name", "seed", "device", "data", "model", "optimizer", "schedule", "epochs", "policy",
               "estimator", "lr_scaling", "target_accuracy", "max_micro_batch", "eval_batch_size",
               "tracking", "sweep", "params", "lr", "momentum", "milestones", "root", "subset", "uri",
               "policy.name", "seed"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["5e-4", "1e3", "cuda:1", "multistep", "fixed"]))
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(min_size=1, max_size=8))
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(keys, inner, max_size=6)), max_leaves=25)
yaml_ish = st.text(alphabet=st.sampled_from(list(":-[]{}#&*!|>'\"%@`,? \n\t.=abc019e")), max_size=80)
garbage = yaml_ish | st.text(max_size=80)
override_keys = st.one_of(st.sampled_from(["epochs", "optimizer.lr", "policy.params.x", "sweep.seed", "schedule",
                                           "tracking.uri.x", "", "a..b", "sweep", "model.params"]), st.text(max_size=10))
overrides = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", override_keys, garbage), st.text(max_size=20)),
                     max_size=3)


def _exercise(text: str, sets: list[str]) -> None:
    try:
        spec = parse_spec(text, source="fuzz.yaml", overrides=sets)
    except SpecError as exc:
        assert exc.problems and all(isinstance(p, Problem) and p.where for p in exc.problems)
        return
    spec.flat_params()
    spec.resolved_yaml()
    try:
        expand_sweep(spec)
    except SpecError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents, overrides)
def test_random_documents_only_ever_raise_spec_error(document, sets):
    if isinstance(document, dict) and len(document) % 2:  # often start valid, so checks go deeper
        document = {**MINIMAL_DICT, **document}
    _exercise(yaml.safe_dump(document), sets)


@settings(max_examples=300, deadline=None)
@given(garbage, overrides)
def test_random_text_only_ever_raises_spec_error(text, sets):
    _exercise(text, sets)
    _exercise(MINIMAL + text, sets)


KNOWN_KEYS = ["seed", "epochs", "device", "lr_scaling", "target_accuracy", "max_micro_batch", "data.subset",
              "optimizer.lr", "optimizer.momentum", "optimizer.nesterov", "schedule.name", "schedule.milestones",
              "schedule.step_size", "policy.params.delta", "tracking.uri", "sweep.seed", "sweep.optimizer.lr"]
plausible = st.one_of(st.integers(-2, 300), st.floats(-1, 2), st.booleans(), st.none(),
                      st.sampled_from(["cosine", "multistep", "step", "cuda:0", "sqrt", "x"]),
                      st.lists(st.integers(0, 50), max_size=3), st.lists(st.floats(0, 1), min_size=1, max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.builds(lambda key, value: f"{key}={json.dumps(value)}", st.sampled_from(KNOWN_KEYS), plausible),
                max_size=4))
def test_plausible_overrides_of_a_valid_spec_round_trip_or_raise_spec_error(sets):
    try:
        spec = parse_spec(DESIGN_EXAMPLE, overrides=sets)
    except SpecError as exc:
        assert exc.problems
        return
    assert parse_spec(spec.resolved_yaml()) == spec
    try:
        points = expand_sweep(spec)
    except SpecError:
        return
    assert all(point.sweep is None and point.flat_params() for _, point in points)

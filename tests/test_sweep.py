"""Sweeps as a user runs them: `dbx run` on a spec with a `sweep:` trains every point as a nested
MLflow run under one parent, names each run after the values it varies, goes on past a failed
point and says so in its exit code, and attaches the comparison to the parent run."""
import textwrap

from click.testing import CliRunner

from dbx.cli import main
from dbx.spec import parse_spec
from dbx.sweep import point_names

BASE = """\
name: tiny-sweep
seed: 0
device: cpu
data: {name: synthetic_logistic, params: {n: 200, d: 6, noise: 0.1}}
model: {name: logreg}
optimizer: {lr: 0.2, momentum: 0.9}
epochs: 2
policy: {name: fixed, params: {batch_size: 16}}
tracking: {system_metrics: false}
"""

POLICIES = BASE + """\
sweep:
  policy:
    - {name: fixed, params: {batch_size: 16}}
    - {name: divebatch, params: {initial: 16, max: 160, delta: 1.0, resize_every: 1}}
  seed: [0, 1]
"""


def names_of(sweep: str, base: str = BASE) -> list[str]:
    return point_names(parse_spec(base + "sweep:\n" + textwrap.indent(textwrap.dedent(sweep), "  ")))


def test_run_names_say_what_each_point_varies():
    assert names_of("policy.name: [fixed, divebatch]\nseed: [0, 1]\n") == [
        "fixed-seed0", "fixed-seed1", "divebatch-seed0", "divebatch-seed1"]
    assert names_of("seed: [3, 4]\n") == ["tiny-sweep-seed3", "tiny-sweep-seed4"]  # only seeds: the spec's name
    assert names_of("optimizer.lr: [0.1, 0.05]\n") == ["lr0.1-seed0", "lr0.05-seed0"]
    # whole plugin blocks: the name, and the params only where they tell same-named values apart
    assert names_of("""\
        policy:
          - {name: fixed, params: {batch_size: 16}}
          - {name: fixed, params: {batch_size: 1024}}
          - {name: adabatch, params: {initial: 16}}
        """) == ["fixed-batch_size16-seed0", "fixed-batch_size1024-seed0", "adabatch-seed0"]
    # keys that vary together: the first names the point, a later value that is the spec's own adds nothing
    assert names_of("""\
        policy+estimator+lr_scaling:
          - [{name: fixed, params: {batch_size: 16}}, {name: exact}, none]
          - [{name: divebatch}, {name: exact}, none]
          - [{name: divebatch}, {name: exact}, linear]
          - [{name: divebatch}, {name: subsampled}, none]
        """, base=BASE + "estimator: {name: exact}\n") == [
        "fixed-seed0", "divebatch-seed0", "divebatch-lr_scalinglinear-seed0", "divebatch-subsampled-seed0"]


def runs_of(uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(ids, order_by=["attributes.start_time ASC"])


def test_a_sweep_is_a_parent_run_with_named_nested_runs_and_its_comparison(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(POLICIES)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["run", str(spec), "--tracking-uri", uri], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "sweep: 4 of 4 runs finished" in result.output

    client, runs = runs_of(uri)
    [parent] = [r for r in runs if r.data.tags.get("dbx.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name == "tiny-sweep" and parent.info.status == "FINISHED"
    assert [r.info.run_name for r in children] == ["fixed-seed0", "fixed-seed1", "divebatch-seed0", "divebatch-seed1"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.params["seed"] for r in children} == {"0", "1"}
    assert children[2].data.params["policy.name"] == "divebatch"
    assert "sweep.policy" in parent.data.params  # the grid itself, among the parent's params
    attached = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/comparison.md", "comparison/curves.png"} <= attached
    table = client.download_artifacts(parent.info.run_id, "comparison/comparison.md", str(tmp_path))
    assert "| fixed (baseline) | 2 |" in open(table).read()

    # dbx compare, with no selection, finds this sweep again
    compared = CliRunner().invoke(main, ["compare", "--tracking-uri", uri, "--format", "csv"])
    assert compared.exit_code == 0, compared.output
    assert [line.split(",")[0] for line in compared.output.splitlines()[1:]] == ["fixed", "divebatch"]


def test_a_sweep_with_a_joint_key_runs_and_logs_it(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(BASE + "sweep:\n  policy.params.batch_size+lr_scaling: [[16, none], [32, linear]]\n")
    uri = f"sqlite:///{tmp_path}/m.db"
    result = CliRunner().invoke(main, ["run", str(spec), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    client, runs = runs_of(uri)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["sweep.policy.params.batch_size/lr_scaling"] == '[[16, "none"], [32, "linear"]]'
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert set(children) == {"batch_size16-seed0", "batch_size32-lr_scalinglinear-seed0"}
    assert children["batch_size32-lr_scalinglinear-seed0"].data.params["lr_scaling"] == "linear"


def test_a_failed_point_is_marked_failed_and_the_sweep_goes_on(tmp_path):
    # lr 1e12 diverges (a RunFailed while training); batch_size -1 is refused by the policy (a
    # UserError before training): both points are FAILED runs, the others train, exit code 1.
    spec = tmp_path / "sweep.yaml"
    spec.write_text(BASE.replace("synthetic_logistic", "synthetic_linear") + """\
sweep:
  policy.params.batch_size: [-1, 16]
  optimizer.lr: [1.0e12, 0.05]
""")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["run", str(spec), "--tracking-uri", uri], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "sweep: 1 of 4 runs finished" in result.output
    assert "batch_size must be a positive integer" in result.output and "diverged" in result.output
    assert "no comparison" in result.output  # a regression task has no accuracy to compare

    _, runs = runs_of(uri)
    status = {r.info.run_name: r.info.status for r in runs}
    assert status == {"tiny-sweep": "FAILED", "batch_size-1-lr1e+12-seed0": "FAILED",
                      "batch_size-1-lr0.05-seed0": "FAILED", "batch_size16-lr1e+12-seed0": "FAILED",
                      "batch_size16-lr0.05-seed0": "FINISHED"}
    reasons = {r.info.run_name: r.data.tags.get("dbx.failure.reason") for r in runs}
    assert reasons["batch_size-1-lr0.05-seed0"] == "input"
    assert reasons["batch_size16-lr1e+12-seed0"] == "nonfinite_loss"
    assert reasons["tiny-sweep"] == "points_failed"


def test_dry_run_lists_the_points_and_starts_nothing(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(POLICIES)
    result = CliRunner().invoke(main, ["run", str(spec), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert result.exit_code == 0, result.output
    assert "4 run(s); nothing was started" in result.output
    assert not (tmp_path / "m.db").exists()


def test_the_synthetic_specs_are_valid_and_the_sweep_is_the_four_methods_times_five_seeds():
    from pathlib import Path

    from dbx.checks import check_spec_file

    folder = Path(__file__).resolve().parent.parent / "experiments" / "synthetic"
    specs = {p.stem: check_spec_file(str(p)) for p in sorted(folder.glob("*.yaml"))}
    assert set(specs) >= {"sgd_small", "sgd_large", "adabatch", "divebatch", "sweep"}
    sweep = specs.pop("sweep")
    assert [p["name"] for p in sweep.sweep["policy"]] == ["fixed", "fixed", "adabatch", "divebatch"]
    for single, value in zip(("sgd_small", "sgd_large", "adabatch", "divebatch"), sweep.sweep["policy"], strict=True):
        assert specs[single].policy.model_dump() == value, single  # the single specs are the sweep's points
        assert specs[single].data == sweep.data and specs[single].optimizer == sweep.optimizer
    assert point_names(sweep)[::5] == ["fixed-batch_size32-seed0", "fixed-batch_size1024-seed0", "adabatch-seed0",
                                       "divebatch-seed0"]
    assert len(point_names(sweep)) == 20


def test_ctrl_c_in_a_point_stops_the_sweep_and_marks_the_parent_killed(tmp_path, monkeypatch):
    from dbx import runner

    calls = []

    def fake_run_one(point, **kwargs):  # the first point finishes, Ctrl-C arrives in the second
        calls.append(kwargs["run_name"])
        return runner.RunResult(0 if len(calls) == 1 else 130)

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(POLICIES)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["run", str(spec), "--tracking-uri", uri], catch_exceptions=False)
    assert result.exit_code == 130, result.output
    assert calls == ["fixed-seed0", "fixed-seed1"] and "(2 not started)" in result.output
    _, [parent] = runs_of(uri)
    assert parent.info.status == "KILLED"


def test_the_goodput_sweeps_are_the_single_specs_of_their_folder_side_by_side():
    from pathlib import Path

    from dbx.checks import check_spec_file
    from dbx.spec import expand_sweep

    experiments = Path(__file__).resolve().parent.parent / "experiments"
    common = ["sgd_small", "sgd_large", "adabatch", "divebatch", "divebatch_rescale", "goodput", "goodput_rescale"]
    for folder, seeds, methods in (("cpu", 3, [*common, "goodput_adascale"]), ("synthetic", 5, common)):
        sweep = check_spec_file(str(experiments / folder / "goodput_sweep.yaml"))
        points = [point for _, point in expand_sweep(sweep)]
        assert len(points) == seeds * len(methods) and [p.seed for p in points[::len(methods)]] == list(range(seeds))
        for method, point in zip(methods, points, strict=False):  # the first seed's points, in order
            single = check_spec_file(str(experiments / folder / f"{method}.yaml"))
            assert point.policy == single.policy and point.lr_scaling == single.lr_scaling, (folder, method)
            assert (point.data, point.model, point.optimizer, point.epochs) == (
                single.data, single.model, single.optimizer, single.epochs), (folder, method)
            if single.policy.name in ("divebatch", "goodput"):
                assert point.estimator == single.estimator, (folder, method)

"""`dbx compare`: the paper's +-1% metric and the common-target metric, checked on curves whose
numbers are worked out by hand, first on plain records, then through a real MLflow store that the
test fills (runs logged with known metrics, as a sweep would), driven through the CLI."""
import json

import pytest
from click.testing import CliRunner

from dbx.cli import main
from dbx.errors import UserError
from dbx.report import RunCurves, compare, mean_se, render

# Hand-made curves (test accuracy per epoch 1..4, training seconds per epoch, eval seconds per epoch).
#
# sgd (2 seeds), the baseline. Mean accuracy per epoch: 0.50, 0.795, 0.895, 0.90; final 0.90.
#   +-1%: the first epoch whose *mean* reaches 0.90 - 0.01 = 0.89 is epoch 3 (seed 0 alone reaches it
#   at epoch 2: per-seed epochs would average 2.5, the paper's metric says 3). Training seconds to
#   epoch 3: seed 0: 3 x 1 = 3, seed 1: 3 x 2 = 6 -> mean 4.5 (= 3 x the mean epoch time 1.5), se 1.5.
#   Common target (default: baseline final - 1 point = 0.89): seed 0 at epoch 2 (2 s; 3 s with eval),
#   seed 1 at epoch 3 (6 s; 7.5 s with eval) -> epochs 2.5 +- 0.5, seconds 4 +- 2, with eval 5.25 +- 2.25.
# dive (3 seeds: unequal group sizes). Finals 0.87, 0.86, 0.87 -> 0.866667; threshold 0.856667;
#   mean per epoch 0.60, 0.843333, 0.858333, 0.866667 -> epoch 3; seconds 1 + 0.5 + 0.5 = 2 on every
#   seed -> 2.0 +- 0. Speedup (+-1%): 4.5 / 2 = 2.25. It never reaches 0.89: "not reached", no speedup.
# ada (2 seeds): seed 0 reaches 0.89 at epoch 3 (3 s), seed 1 never: "3.0 (1/2)", speedup n/a.
SGD = [([0.50, 0.89, 0.89, 0.90], [1, 1, 1, 1]), ([0.50, 0.70, 0.90, 0.90], [2, 2, 2, 2])]
DIVE = [([0.60, 0.86, 0.86, 0.87], [1, .5, .5, .5]), ([0.60, 0.84, 0.86, 0.86], [1, .5, .5, .5]),
        ([0.60, 0.83, 0.855, 0.87], [1, .5, .5, .5])]
ADA = [([0.50, 0.80, 0.90, 0.90], [1, 1, 1, 1]), ([0.50, 0.80, 0.85, 0.86], [1, 1, 1, 1])]
GROUPS = {"sgd": SGD, "dive": DIVE, "ada": ADA}
EVAL = [0.5, 0.5, 0.5, 0.5]


def curves():
    return [RunCurves(f"{group}-seed{seed}", group, [1, 2, 3, 4], acc, seconds, EVAL)
            for group, runs in GROUPS.items() for seed, (acc, seconds) in enumerate(runs)]


def by_group(comparison):
    return {g.group: g for g in comparison.groups}


def test_the_paper_metric_is_taken_on_the_seed_averaged_curve_against_each_groups_own_final():
    groups = by_group(compare(curves()))
    sgd, dive = groups["sgd"], groups["dive"]
    assert sgd.final_accuracy.mean == pytest.approx(0.90) and sgd.final_accuracy.se == pytest.approx(0.0)
    assert sgd.epochs_to_own == 3
    assert sgd.seconds_to_own.mean == pytest.approx(4.5) and sgd.seconds_to_own.se == pytest.approx(1.5)
    assert dive.final_accuracy.mean == pytest.approx(0.866667, abs=1e-6) and dive.final_accuracy.n == 3
    assert dive.epochs_to_own == 3 and dive.seconds_to_own.mean == pytest.approx(2.0)
    assert dive.speedup_own == pytest.approx(2.25) and sgd.speedup_own == pytest.approx(1.0)
    assert dive.best_accuracy.mean == pytest.approx((0.87 + 0.86 + 0.87) / 3)


def test_the_common_target_is_per_seed_and_a_group_that_never_reaches_it_is_not_counted_as_zero():
    comparison = compare(curves())
    assert comparison.baseline == "sgd" and comparison.target == pytest.approx(0.89)
    groups = by_group(comparison)
    sgd, dive, ada = groups["sgd"], groups["dive"], groups["ada"]
    assert (sgd.epochs_to_target.mean, sgd.epochs_to_target.se) == pytest.approx((2.5, 0.5))
    assert (sgd.seconds_to_target.mean, sgd.seconds_to_target.se) == pytest.approx((4.0, 2.0))
    assert (sgd.seconds_to_target_with_eval.mean, sgd.seconds_to_target_with_eval.se) == pytest.approx((5.25, 2.25))
    assert not dive.epochs_to_target.reached and dive.seconds_to_target.mean is None and dive.speedup_target is None
    assert (ada.epochs_to_target.mean, ada.epochs_to_target.n, ada.epochs_to_target.of) == (3.0, 1, 2)
    assert ada.speedup_target is None  # half the seeds never got there: a speedup would flatter it

    row = {r[0]: r for r in (line.split(" | ") for line in render(comparison, "markdown").splitlines()[2:5])}
    assert row["| dive"][7:10] == ["not reached"] * 3 and row["| dive"][10] == "n/a |"
    assert row["| ada"][7] == "3.0 (1/2)"
    assert row["| sgd (baseline)"][4:7] == ["3", "4.50 ± 1.50", "1.00x"]


def test_an_explicit_target_and_baseline():
    groups = by_group(compare(curves(), baseline="dive", target=0.85))
    dive, sgd = groups["dive"], groups["sgd"]
    # dive: epochs 2, 3, 3 (0.855 at epoch 3 for seed 2); seconds 1.5, 2, 2
    assert dive.epochs_to_target.mean == pytest.approx(8 / 3)
    assert dive.seconds_to_target.mean == pytest.approx(5.5 / 3)
    # sgd: epochs 2 and 3 -> seconds 2 and 6 -> 4; speedup against dive: (5.5/3) / 4
    assert sgd.speedup_target == pytest.approx((5.5 / 3) / 4)
    assert sgd.speedup_own == pytest.approx(2.0 / 4.5)


def test_standard_error_and_unknown_baseline():
    assert mean_se([1.0, 3.0]).se == pytest.approx(1.0)
    assert mean_se([2.0]).se is None and mean_se([]).mean is None
    with pytest.raises(UserError, match="'nope' is not one of the groups: sgd, dive, ada"):
        compare(curves(), baseline="nope")


# --------------------------------------------------------------------------------------------
# Through MLflow and the CLI
# --------------------------------------------------------------------------------------------


def log_run(client, experiment_id, name, accuracy, seconds, *, parent=None, status="FINISHED", policy="fixed"):
    """A run as dbx logs it: per-epoch metrics, then the summary (which re-logs eval_seconds, the
    total, at the last step)."""
    from mlflow.entities import Metric, Param

    tags = {"mlflow.parentRunId": parent} if parent else {}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    metrics = []
    cumulative = 0.0
    for epoch, (acc, sec) in enumerate(zip(accuracy, seconds, strict=True), 1):
        cumulative += sec
        for key, value in {"test_accuracy": acc, "epoch_seconds": sec, "eval_seconds": 0.5, "train_seconds": cumulative,
                           "wall_seconds": cumulative + 0.5 * epoch, "batch_size": 32.0 * epoch, "lr": 0.1}.items():
            metrics.append(Metric(key, value, 1000 * epoch, epoch))
    metrics.append(Metric("eval_seconds", 0.5 * len(accuracy), 1000 * len(accuracy) + 1, len(accuracy)))
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param("policy.name", policy)])
    client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with the hand-made curves as one sweep (a parent and its nested runs), one
    FAILED run, and an experiment with no runs. Shared by the tests below, which only read it
    (``--log`` adds artifacts to the parent, which nothing else looks at)."""
    from mlflow import MlflowClient

    tmp_path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("handmade", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="handmade", tags={"dbx.sweep": "true"}).info.run_id
    for group, runs in GROUPS.items():
        for seed, (acc, sec) in enumerate(runs):
            log_run(client, experiment, f"{group}-seed{seed}", acc, sec, parent=parent,
                    policy="divebatch" if group == "dive" else "fixed")
    log_run(client, experiment, "sgd-seed9", [0.1, 0.1, 0.1, 0.1], [1, 1, 1, 1], parent=parent, status="FAILED")
    client.set_terminated(parent)
    client.create_experiment("empty", artifact_location=(tmp_path / "artifacts2").as_uri())
    return uri, parent


def dbx(*args):
    return CliRunner().invoke(main, list(args))


def test_compare_reads_the_runs_back_from_mlflow_with_the_same_numbers(store):
    uri, parent = store
    result = dbx("compare", "--tracking-uri", uri, "--experiment", "handmade", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    groups = {g["group"]: g for g in data["groups"]}
    assert list(groups) == ["sgd", "dive", "ada"] and data["baseline"] == "sgd"
    assert groups["sgd"]["epochs_to_own"] == 3 and groups["sgd"]["seconds_to_own"]["mean"] == pytest.approx(4.5)
    # eval_seconds at the last epoch is that epoch's own 0.5, not the summary's total re-logged at the same step
    assert groups["sgd"]["seconds_to_target_with_eval"]["mean"] == pytest.approx(5.25)
    assert groups["dive"]["speedup_own"] == pytest.approx(2.25)
    assert groups["dive"]["epochs_to_target"] == {"mean": None, "se": None, "n": 0, "of": 3}
    assert data["skipped"] == ["sgd-seed9 (FAILED)"]


def test_markdown_csv_and_table_say_not_reached(store):
    uri, parent = store
    markdown = dbx("compare", "--tracking-uri", uri, "--parent", parent, "--format", "markdown")
    assert markdown.exit_code == 0, markdown.output
    assert markdown.output.startswith("| group | runs | final acc % |")
    assert "| dive | 3 | 86.67 ± 0.33 |" in markdown.output and "not reached" in markdown.output
    csv = dbx("compare", "--tracking-uri", uri, "--parent", parent, "--format", "csv").output.splitlines()
    header, dive = csv[0].split(","), dict(zip(csv[0].split(","), csv[2].split(","), strict=True))
    assert "seconds_to_target_mean" in header and dive["group"] == "dive"
    assert dive["seconds_to_target_mean"] == "" and dive["seconds_to_target_n"] == "0/3"
    table = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["compare", "--tracking-uri", uri, "--parent", parent])
    assert table.exit_code == 0 and "not reached" in table.output and "sgd (baseline)" in table.output


def test_group_by_a_param_baseline_target_plot_and_log(store, tmp_path):
    from mlflow import MlflowClient

    uri, parent = store
    plot = tmp_path / "curves.png"
    result = dbx("compare", "--tracking-uri", uri, "--parent", parent, "--group-by", "policy.name",
                 "--baseline", "divebatch", "--target", "0.85", "--format", "json", "--plot", str(plot), "--log")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [g["group"] for g in data["groups"]] == ["fixed", "divebatch"] and data["target"] == 0.85
    assert {g["group"]: len(g["runs"]) for g in data["groups"]} == {"fixed": 4, "divebatch": 3}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(tracking_uri=uri)
    attached = {a.path for a in client.list_artifacts(parent, "comparison")}
    assert attached == {"comparison/comparison.md", "comparison/comparison.csv", "comparison/comparison.json",
                        "comparison/curves.png"}


def test_without_a_selection_the_latest_sweep_is_compared(store):
    uri, _ = store
    result = dbx("compare", "--tracking-uri", uri, "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert "sweep handmade" in result.output


@pytest.mark.parametrize("args, message", [
    (["--experiment", "empty"], "experiment empty in sqlite:///"),
    (["--experiment", "nope"], "no experiment 'nope'"),
    (["--parent", "0123abcd"], "no run '0123abcd'"),
    (["--experiment", "handmade", "--baseline", "nope"], "'nope' is not one of the groups"),
    (["--experiment", "handmade", "--target", "89"], "not an accuracy between 0 and 1"),
])
def test_nothing_to_compare_is_a_clear_input_error(store, args, message):
    uri, _ = store
    result = dbx("compare", "--tracking-uri", uri, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_an_experiment_with_no_runs_says_so(store):
    uri, _ = store
    result = dbx("compare", "--tracking-uri", uri, "--experiment", "empty")
    assert result.exit_code == 2
    assert result.output.startswith("error: experiment empty in ") and "has no runs" in result.output


def test_a_missing_store_is_an_input_error(tmp_path):
    result = dbx("compare", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert result.exit_code == 2 and "there is no MLflow store" in result.output
    assert not (tmp_path / "none.db").exists()


def test_ui_without_a_store_is_an_input_error_and_starts_nothing(tmp_path):
    result = dbx("ui", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert result.exit_code == 2 and "there is no MLflow store" in result.output


def test_compare_and_ui_help_import_neither_torch_nor_mlflow():
    import subprocess
    import sys

    code = ("import sys\nfrom click.testing import CliRunner\nfrom dbx.cli import main\n"
            "for args in (['compare', '--help'], ['ui', '--help']):\n"
            "    assert CliRunner().invoke(main, args).exit_code == 0\n"
            "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

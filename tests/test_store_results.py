"""Results a user can check from the MLflow store alone: what a policy was given is logged (n, the
world size, each estimate's sample count and sums), so its decisions replay from the store, and
`dbx compare` and the plots use those numbers."""
import json
import math

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from dbx.cli import main

SPEC = """\
name: replayed
device: cpu
data: {name: synthetic_logistic, params: {n: 600, d: 8, noise: 0.1}}
model: {name: logreg}
optimizer: {lr: 0.2}
epochs: 5
policy: {name: divebatch, params: {initial: 8, max: 256, delta: 0.05, resize_every: 2}}
tracking: {system_metrics: false}
sweep: {seed: [0, 1]}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    (folder / "spec.yaml").write_text(SPEC)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["run", str(folder / "spec.yaml"), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=uri)
    runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
            if r.data.tags.get("dbx.sweep") != "true"]
    return uri, client, runs


def test_the_store_holds_what_the_policy_was_given(store):
    uri, client, runs = store
    for run in runs:
        params = run.data.params
        assert params["dbx.train_size"] == "480" and params["dbx.test_size"] == "120"
        assert params["dbx.world_size"] == "1" and int(params["dbx.model_parameters"]) == 18
        measured = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "diversity")}
        assert sorted(measured) == [2, 4]  # resize_every 2: the measuring epochs only
        for key in ("diversity_samples", "sum_sq_norms", "sq_norm_of_sum"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [2, 4], key
        samples = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "diversity_samples")}
        assert samples == {2: 480.0, 4: 480.0}  # the exact estimator sees every sample of the epoch
        sums = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                for key in ("sum_sq_norms", "sq_norm_of_sum")}
        for epoch, value in measured.items():
            assert value == pytest.approx(sums["sum_sq_norms"][epoch] / sums["sq_norm_of_sum"][epoch], rel=1e-9)


def test_a_divebatch_decision_replays_from_the_store_alone(store):
    """B_next = int(min(max(delta * n * diversity, B), max)), every number read from MLflow."""
    uri, client, runs = store
    grew = 0
    for run in runs:
        params = run.data.params
        delta, cap, n = float(params["policy.params.delta"]), int(params["policy.params.max"]), int(params["dbx.train_size"])
        sizes = {m.step: int(m.value) for m in client.get_metric_history(run.info.run_id, "batch_size")}
        for m in client.get_metric_history(run.info.run_id, "diversity"):
            by_hand = int(min(max(delta * n * m.value, sizes[m.step]), cap))
            if m.step + 1 in sizes:
                assert sizes[m.step + 1] == by_hand
                grew += by_hand > sizes[m.step]
    assert grew >= 1, "no decision changed the batch size: the replay would prove nothing"


def test_every_decision_replays_through_the_policy_itself(store):
    from dbx.replay import replay_decisions

    uri, _, runs = store
    for run in runs:
        decisions = replay_decisions(uri, run.info.run_id)
        assert [d.epoch for d in decisions] == [1, 2, 3, 4, 5]
        assert all(d.logged == d.replayed for d in decisions if d.logged is not None), decisions


def test_a_run_logged_before_the_train_size_was_cannot_be_replayed(store):
    from dbx.errors import UserError
    from dbx.replay import epoch_inputs

    uri, client, runs = store
    older = client.get_run(runs[0].info.run_id)
    del older.data._params["dbx.train_size"]
    with pytest.raises(UserError, match="did not log its training-set size"):
        epoch_inputs(client, older)


def test_compare_reports_n_and_plots_the_noise_scale(store, tmp_path):
    from dbx import report

    uri, _, _ = store
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", uri, "--format", "json"])
    assert result.exit_code == 0, result.output
    [group] = json.loads(result.output)["groups"]
    assert group["train_size"] == [480]
    markdown = CliRunner().invoke(main, ["compare", "--tracking-uri", uri, "--format", "markdown"])
    assert "Every run trained on n = 480 samples." in markdown.output

    comparison = report.load_comparison(uri)
    [curves] = [g.curves for g in comparison.groups]
    epochs, mean, _ = curves.measured["noise_scale"]
    assert epochs == [2, 4] and all(math.isfinite(v) for v in mean)
    assert curves.series["samples_seen"][0] == [480.0 * e for e in range(1, 6)]
    figure = report.figure(comparison)
    noise_axis = figure.axes[5]
    assert noise_axis.get_ylabel().startswith("noise scale") and noise_axis.has_data()
    assert figure.axes[2].get_xlabel() == "training samples seen"
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_runs_with_different_n_are_flagged_in_the_comparison():
    from dbx import report

    def run(name, n):
        return report.RunCurves(name, name.split("-")[0], [1, 2], [0.5, 0.6], [1.0, 1.0], [0.1, 0.1], train_size=n)

    comparison = report.compare([run("a-seed0", 100), run("b-seed0", 200)])
    comparison.train_sizes = {"a": [100], "b": [200]}
    assert any(line.startswith("Warning: the runs trained on different numbers of samples n (a: 100; b: 200)")
               for line in report.notes(comparison))


def test_one_runs_plot_shows_the_noise_scale_beside_the_batch_size():
    from dbx.plots import training_curves

    history = [{"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.1 / e, "batch_size": 8.0 * e, "lr": 0.1,
                **({"diversity": 0.05, "diversity_samples": 480.0} if e % 2 == 0 else {})} for e in range(1, 5)]
    figure = training_curves(history)
    batch_axis = figure.axes[2]
    labels = [line.get_label() for line in batch_axis.get_lines()]
    assert labels == ["batch size", "noise scale m·diversity − 1"]
    assert list(batch_axis.get_lines()[1].get_ydata()) == [480 * 0.05 - 1] * 2
    import matplotlib.pyplot as plt

    plt.close(figure)

"""Reliability: a killed run resumes to the same result, damaged checkpoints are skipped, no run
stays RUNNING after its process is gone, and stop signals close the run as Ctrl-C does.
(Bad inputs, one table of them, are in test_bad_inputs.py.)"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from dbx.cli import main
from dbx.train.checkpoint import list_checkpoints, load_latest, read_checkpoint, save_checkpoint

# About a second per epoch on one CPU core, so a kill lands inside an epoch; DiveBatch with
# resize_every 2 exercises the policy's and the estimator's state across the kill.
SLOW = """\
name: killme
seed: 3
device: cpu
data: {name: synthetic_logistic, params: {n: 6000, d: 32, noise: 0.1}}
model: {name: mlp, params: {widths: [64]}}
optimizer: {lr: 0.05, momentum: 0.9, weight_decay: 5e-4}
epochs: 6
policy: {name: divebatch, params: {initial: 8, max: 512, delta: 0.05, resize_every: 2}}
checkpoint: {keep_last: 3}
tracking: {system_metrics: false}
"""
COMPARED = ["train_loss", "train_accuracy", "test_loss", "test_accuracy", "batch_size", "lr", "diversity",
            "samples_seen", "optimizer_steps"]


TINY = """\
name: tiny
device: cpu
data: {name: synthetic_logistic, params: {n: 300, d: 4}}
model: {name: logreg}
optimizer: {lr: 0.1}
epochs: 2
policy: {name: divebatch, params: {initial: 8, max: 64, resize_every: 1}}
tracking: {system_metrics: false}
"""


def edit(old: str, new: str) -> str:
    assert old in TINY
    return TINY.replace(old, new)


def write(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def store(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def only_run(uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


def histories(uri: str, keys: list[str] = COMPARED) -> dict[str, list[tuple[int, float]]]:
    client, run = only_run(uri)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) for key in keys}


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    [ckpt_dir] = (folder / "dbx-checkpoints").iterdir()
    return read_checkpoint(list_checkpoints(ckpt_dir)[-1])["model"]


def kill_during_epoch(spec: Path, folder: Path, after_checkpoint: int) -> str:
    """Start `dbx run` in a subprocess, SIGKILL it just after the given epoch's checkpoint."""
    log = open(folder / "run.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "dbx.cli", "run", str(spec), "--tracking-uri", store(folder)],
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    pattern = f"dbx-checkpoints/*/epoch-{after_checkpoint:04d}.ckpt"
    while not list(folder.glob(pattern)):
        assert process.poll() is None, (folder / "run.log").read_text()
        assert time.monotonic() < deadline, "the run never reached its checkpoint"
        time.sleep(0.05)
    time.sleep(0.05)  # into the next epoch (one at B = 8 takes about a second here)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    [run_folder] = (folder / "dbx-checkpoints").iterdir()
    return run_folder.name  # the run id


def newest_epoch(folder: Path, run_id: str) -> int:
    return int(list_checkpoints(folder / "dbx-checkpoints" / run_id)[-1].stem.split("-")[1])


@pytest.mark.slow
def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = CliRunner().invoke(main, ["run", str(write(straight, SLOW)), "--tracking-uri", store(straight)])
    assert result.exit_code == 0, result.output

    # Epoch 2 runs at B = 8 and is a measuring epoch: the kill lands inside the estimator's work
    # (on a machine loaded enough to starve this test for a second, it lands later: still a kill)
    run_id = kill_during_epoch(write(killed, SLOW), killed, after_checkpoint=1)
    newest = newest_epoch(killed, run_id)
    _, run = only_run(store(killed))
    assert run.info.status == "RUNNING"  # SIGKILL left no chance to close it
    result = CliRunner().invoke(main, ["resume", run_id, "--tracking-uri", store(killed)])
    assert result.exit_code == 0, result.output
    assert f"after epoch {newest}" in result.output

    _, run = only_run(store(killed))
    assert run.info.status == "FINISHED"
    resumed, expected = histories(store(killed)), histories(store(straight))
    for key in COMPARED:
        assert [step for step, _ in resumed[key]] == [step for step, _ in expected[key]], f"{key} logged twice or missed"
    assert resumed == expected  # bit for bit on the CPU
    for name, tensor in final_weights(straight).items():
        assert torch.equal(tensor, final_weights(killed)[name]), name


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    for epoch in (1, 2):
        save_checkpoint(tmp_path, epoch, {"epoch": epoch}, keep_last=5)
    newest = list_checkpoints(tmp_path)[-1]
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="fails its checksum"):
        path, payload = load_latest(tmp_path)
    assert payload == {"epoch": 1} and path.name == "epoch-0001.ckpt"


def test_a_checkpoint_cut_short_is_skipped_too(tmp_path):
    save_checkpoint(tmp_path, 1, {"epoch": 1}, keep_last=5)
    save_checkpoint(tmp_path, 2, {"epoch": 2}, keep_last=5)
    newest = list_checkpoints(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:20])
    with pytest.warns(UserWarning, match="cut short"):
        assert load_latest(tmp_path)[1] == {"epoch": 1}


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for epoch in range(1, 6):
        save_checkpoint(tmp_path, epoch, {"epoch": epoch}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0004.ckpt", "epoch-0005.ckpt"]
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.slow
def test_resume_after_a_damaged_checkpoint_redoes_the_epoch_without_logging_it_twice(tmp_path):
    folder = tmp_path / "run"
    # Three slow epochs at B = 8 before the first resize: the kill lands inside epoch 3.
    spec = write(folder, SLOW.replace("resize_every: 2", "resize_every: 3"))
    run_id = kill_during_epoch(spec, folder, after_checkpoint=2)
    newest = newest_epoch(folder, run_id)  # 2, unless a loaded machine let epoch 3 end first
    list_checkpoints(folder / "dbx-checkpoints" / run_id)[-1].write_bytes(b"garbage")
    result = CliRunner().invoke(main, ["resume", run_id, "--tracking-uri", store(folder)])
    assert result.exit_code == 0, result.output
    assert "skipping damaged checkpoint" in result.output
    assert f"after epoch {newest - 1}" in result.output
    steps = [step for step, _ in histories(store(folder))["test_loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_skip_step_fails_the_run_when_every_step_is_non_finite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write(tmp_path, edit("lr: 0.1", "lr: 1.0e30").replace("synthetic_logistic", "synthetic_linear")
                 + "on_nonfinite: skip_step\n")
    result = CliRunner().invoke(main, ["run", str(spec)])
    assert result.exit_code == 1 and "diverged" in result.output
    _, run = only_run(store(tmp_path))
    assert run.info.status == "FAILED"
    assert run.data.tags["dbx.failure.reason"] == "nonfinite_loss"
    assert int(run.data.tags["dbx.failure.step"]) >= 1


def start_held(spec: Path, folder: Path, point: str, *args: str) -> subprocess.Popen:
    """`dbx run` in a real process, held at ``point`` (dbx.faults): returns once it is there, so
    that the signal the test sends lands at a known moment however loaded the machine is."""
    held = folder / "held"
    env = {**os.environ, "DBX_HOLD_AT": point, "DBX_HOLD_FILE": str(held)}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(folder / "run.log", "w")
    # a shell's background job inherits an ignored SIGINT (Python then keeps ignoring it): restore it
    process = subprocess.Popen([sys.executable, "-m", "dbx.cli", "run", str(spec), "--tracking-uri", store(folder),
                                *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not held.exists():
        assert process.poll() is None, (folder / "run.log").read_text()
        assert time.monotonic() < deadline, "the run never reached " + point
        time.sleep(0.05)
    return process


def kill(process: subprocess.Popen, how: int = signal.SIGKILL) -> int:
    process.send_signal(how)
    return process.wait(timeout=120)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_marks_the_run_killed_and_it_can_be_resumed(tmp_path, stop):
    """Held just after epoch 1's checkpoint, before its metrics reach the store: the signal lands
    there on any machine (a timer-based version of this test raced with a loaded machine)."""
    folder = tmp_path / "run"
    spec = write(folder, TINY.replace("epochs: 2", "epochs: 3"))
    process = start_held(spec, folder, "checkpoint:1")
    client, run = only_run(store(folder))
    refused = CliRunner().invoke(main, ["resume", run.info.run_id, "--tracking-uri", store(folder)])
    assert refused.exit_code == 2 and f"is still running (pid {process.pid} on host" in refused.output

    assert kill(process, stop) == 130, (folder / "run.log").read_text()
    log = (folder / "run.log").read_text()
    assert "marked KILLED" in log and "Aborted!" not in log and "Traceback" not in log
    client, run = only_run(store(folder))
    assert run.info.status == "KILLED"
    assert run.data.tags["dbx.failure.reason"] == "interrupted"

    result = CliRunner().invoke(main, ["resume", run.info.run_id, "--tracking-uri", store(folder)])
    assert result.exit_code == 0, result.output
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_loss")] == [1, 2, 3]
    _, resumed = only_run(store(folder))
    assert resumed.info.status == "FINISHED"
    assert not any(key.startswith("dbx.failure.") for key in resumed.data.tags)
    assert resumed.data.tags["dbx.resume.1"] == "was KILLED: interrupted"


def test_sigterm_just_after_the_tracking_line_marks_the_run_killed(tmp_path):
    folder = tmp_path / "run"
    process = start_held(write(folder, TINY), folder, "run-open")
    assert "tracking: " in (folder / "run.log").read_text()
    assert kill(process, signal.SIGTERM) == 130
    log = (folder / "run.log").read_text()
    assert "Aborted!" not in log and "interrupted in epoch 1" in log
    assert only_run(store(folder))[1].info.status == "KILLED"


def test_a_run_killed_before_its_first_checkpoint_is_marked_and_trained_again_from_the_start(tmp_path):
    straight, folder = tmp_path / "straight", tmp_path / "killed"
    assert CliRunner().invoke(main, ["run", str(write(straight, TINY)), "--tracking-uri", store(straight)]).exit_code == 0
    spec = write(folder, TINY)
    process = start_held(spec, folder, "run-open")
    assert kill(process) == -signal.SIGKILL
    client, run = only_run(store(folder))
    assert run.info.status == "RUNNING"  # nothing could close it

    # the next `dbx run` on the store sees that the process is gone and marks the run
    other = CliRunner().invoke(main, ["run", str(spec), "--tracking-uri", store(folder), "--set", "epochs=1",
                                      "--experiment", "other"])
    assert other.exit_code == 0, other.output
    assert f"marked run tiny-seed0 ({run.info.run_id}) KILLED: its process (pid {process.pid} on host" in other.output
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and run.data.tags["dbx.failure.reason"] == "process_gone"

    result = CliRunner().invoke(main, ["resume", run.info.run_id, "--tracking-uri", store(folder)])
    assert result.exit_code == 0, result.output
    assert "has no checkpoint: training it again from the beginning" in result.output
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    keys = ["train_loss", "test_loss", "test_accuracy", "batch_size", "lr", "diversity", "samples_seen"]
    resumed = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in keys}
    assert resumed == histories(store(straight), keys)  # bit for bit on the CPU


def test_a_run_killed_after_its_last_checkpoint_is_found_stale_and_closed_by_resume(tmp_path):
    """Killed between the final checkpoint and the last epoch's metrics: the store lacks the last
    epoch and the summary. `dbx runs --stale` marks it; resume logs what is missing and closes it."""
    straight, folder = tmp_path / "straight", tmp_path / "killed"
    assert CliRunner().invoke(main, ["run", str(write(straight, TINY)), "--tracking-uri", store(straight)]).exit_code == 0
    process = start_held(write(folder, TINY), folder, "checkpoint:2")
    assert kill(process) == -signal.SIGKILL
    client, run = only_run(store(folder))
    assert run.info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_loss")] == [1]

    listed = CliRunner().invoke(main, ["runs", "--tracking-uri", store(folder)])
    assert listed.exit_code == 0 and run.info.run_id in listed.output and "process gone" in listed.output
    marked = CliRunner().invoke(main, ["runs", "--stale", "--tracking-uri", store(folder)])
    assert marked.exit_code == 0 and "1 stale run(s) marked KILLED" in marked.output, marked.output
    assert f"pid {process.pid} on host" in client.get_run(run.info.run_id).data.tags["dbx.failure.message"]

    result = CliRunner().invoke(main, ["resume", run.info.run_id, "--tracking-uri", store(folder)])
    assert result.exit_code == 0, result.output
    assert "had trained all 2 epochs when it stopped" in result.output
    _, run = only_run(store(folder))
    _, expected = only_run(store(straight))
    assert run.info.status == "FINISHED"
    assert set(run.data.metrics) == set(expected.data.metrics)
    keys = ["train_loss", "test_loss", "test_accuracy", "batch_size", "final_test_accuracy", "best_test_accuracy"]
    assert histories(store(folder), keys) == histories(store(straight), keys)
    again = CliRunner().invoke(main, ["resume", run.info.run_id, "--tracking-uri", store(folder)])
    assert again.exit_code == 2 and "has finished" in again.output


PLUGINS_THAT_BREAK = {
    # kind: (distribution, entry point, module source, spec edits, the call named)
    "model": ("flaky-model", "[dbx.models]\nflaky = flaky_model_mod:flaky\n", """
        import torch

        class Flaky(torch.nn.Linear):
            calls = 0
            def forward(self, x):
                Flaky.calls += 1
                if Flaky.calls > 60:
                    raise RuntimeError("the flaky layer broke")
                return super().forward(x)

        def flaky(*, num_classes, input_shape):
            return Flaky(input_shape[0], num_classes)
        """, [("name: logreg", "name: flaky"), ("{name: divebatch, params: {initial: 8, max: 64, resize_every: 1}}",
                                                "{name: fixed, params: {batch_size: 8}}")], "forward"),
    "policy": ("grumpy-policy", "[dbx.policies]\ngrumpy = blame_grumpy_policy:Grumpy\n", """
        from dbx.policies.fixed import FixedBatch

        class Grumpy(FixedBatch):
            def next_batch_size(self, state, diversity):
                if state.epoch >= 1:
                    raise ValueError("the grumpy rule refuses")
                return super().next_batch_size(state, diversity)
        """, [("{name: divebatch, params: {initial: 8, max: 64, resize_every: 1}}", "{name: grumpy}")],
        "next_batch_size"),
    "estimator": ("sloppy-estimator", "[dbx.estimators]\nsloppy = blame_sloppy_estimator:Sloppy\n", """
        from dbx.estimators.exact import ExactEstimator

        class Sloppy(ExactEstimator):
            def estimate(self, model, loss_fn, data):
                return self.finish_the_sums()  # a method it does not have
        """, [("resize_every: 1}}", "resize_every: 1}}\nestimator: {name: sloppy}")], "estimate"),
}


@pytest.mark.parametrize("kind", list(PLUGINS_THAT_BREAK))
def test_an_exception_in_a_plugin_fails_the_run_naming_the_plugin_its_distribution_and_the_call(site, kind):
    """A plugin (from a tiny real distribution) that breaks during training: the FAILED run's tags
    and the message on stderr say which plugin, from which package, in which call."""
    from distributions import install

    from dbx import registry

    dist, entry_points, source, edits, call = PLUGINS_THAT_BREAK[kind]
    install(site, dist, entry_points, {entry_points.split("= ")[1].split(":")[0]: source})
    registry.refresh()
    name = entry_points.split("\n")[1].split(" =")[0]
    text = TINY
    for old, new in edits:
        text = text.replace(old, new)
    result = CliRunner().invoke(main, ["run", str(write(site.parent, text))])
    assert result.exit_code == 1, result.output
    named = f"{kind} {name!r} ({dist} 1.2.3) raised in {call}"
    assert named in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2
    _, run = only_run(store(site.parent))
    assert run.info.status == "FAILED"
    assert run.data.tags["dbx.failure.reason"] == "exception"
    assert run.data.tags["dbx.failure.message"].startswith(named + ": ")
    assert run.data.tags["dbx.failure.plugin"] == f"{kind} {name!r} ({dist} 1.2.3)"
    assert run.data.tags["dbx.failure.call"] == call


def test_an_exception_in_dbx_itself_blames_no_plugin(tmp_path, monkeypatch):
    from dbx.train import loop

    def broken(*args, **kwargs):
        raise ZeroDivisionError("dbx's own bug")

    monkeypatch.setattr(loop, "evaluate", broken)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", str(write(tmp_path, TINY))])
    assert result.exit_code == 1 and "run failed: ZeroDivisionError: dbx's own bug" in result.output
    _, run = only_run(store(tmp_path))
    assert "dbx.failure.plugin" not in run.data.tags


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["sigterm", "sighup", "sigint"])
def test_each_stop_signal_interrupts_like_ctrl_c_and_not_while_closing(stop):
    from dbx import stopping

    with stopping.signals_stop_like_ctrl_c():
        with pytest.raises(KeyboardInterrupt, match=signal.Signals(stop).name):
            os.kill(os.getpid(), stop)
            time.sleep(5)  # the handler raises before this ends
        stopping.handled()
        with stopping.closing():
            os.kill(os.getpid(), stop)  # recorded, not raised: the run's closing goes on
            time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt, match="received earlier"):
            stopping.raise_if_stopped()
        stopping.raise_if_stopped()  # once only
    assert signal.getsignal(stop) is not stopping._stop


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowing, as it happens
def test_a_stop_signal_swallowed_by_a_finalizer_still_stops_the_run_at_the_epochs_end(tmp_path, monkeypatch):
    """Python loses an exception raised in a finalizer; SQLAlchemy returns connections to its
    pool in such callbacks, and a SIGTERM that landed there let the run finish (exit 0)."""
    import gc
    import weakref

    from dbx.train import loop

    class Finalized:
        pass

    real_fit = loop.fit

    def fit_with_a_signal_in_a_finalizer(*args, **kwargs):
        obj = Finalized()
        weakref.finalize(obj, lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(0.05))
        del obj
        gc.collect()  # the handler's KeyboardInterrupt is raised inside the callback, and lost
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(loop, "fit", fit_with_a_signal_in_a_finalizer)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", str(write(tmp_path, TINY))])  # `run` installs the handlers
    assert result.exit_code == 130, result.output
    _, run = only_run(store(tmp_path))
    assert run.info.status == "KILLED"
    assert [m.step for m in MlflowClient(tracking_uri=store(tmp_path)).get_metric_history(run.info.run_id, "test_loss")] == []


def test_a_processes_liveness_is_judged_on_this_machine_only():
    from dbx import liveness

    mine = liveness.process_tags()
    assert liveness.process_state(mine) == liveness.ALIVE
    assert liveness.process_state({**mine, liveness.START_TAG: "1"}) == liveness.GONE  # the pid was reused
    assert liveness.process_state({**mine, liveness.BOOT_TAG: "another-boot"}) == liveness.GONE  # rebooted since
    assert liveness.process_state({**mine, liveness.HOST_TAG: "elsewhere.example"}) == liveness.ELSEWHERE
    assert liveness.process_state({**mine, liveness.NAMESPACE_TAG: "pid:[1]"}) == liveness.ELSEWHERE  # a container
    assert liveness.process_state({}) == liveness.UNKNOWN  # a run from before dbx recorded its process
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert liveness.process_state({**mine, liveness.PID_TAG: finished.stdout.strip()}) == liveness.GONE


def test_resuming_a_run_that_runs_on_another_machine_needs_force(tmp_path, monkeypatch):
    from dbx import liveness

    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(main, ["run", str(write(tmp_path, TINY))]).exit_code == 0
    client, run = only_run(store(tmp_path))
    client.set_tag(run.info.run_id, liveness.HOST_TAG, "gpu-node-7")
    client.update_run(run.info.run_id, status="RUNNING")  # as that machine left it
    result = CliRunner().invoke(main, ["resume", run.info.run_id])
    assert result.exit_code == 2
    assert "RUNNING on another machine (pid" in result.output and "gpu-node-7" in result.output
    assert "--force" in result.output
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # untouched
    forced = CliRunner().invoke(main, ["resume", run.info.run_id, "--force"])
    assert forced.exit_code == 0, forced.output  # every epoch is checkpointed: it is closed
    assert client.get_run(run.info.run_id).info.status == "FINISHED"

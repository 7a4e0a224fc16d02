"""Reliability: a killed run resumes to the same result, damaged checkpoints are skipped, and every
bad input is answered with a clear message, exit code 2, and nothing created."""
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

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


def histories(uri: str) -> dict[str, list[tuple[int, float]]]:
    client, run = only_run(uri)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) for key in COMPARED}


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

    # Epoch 2 runs at B = 8 and is a measuring epoch: the kill lands inside the estimator's work.
    run_id = kill_during_epoch(write(killed, SLOW), killed, after_checkpoint=1)
    assert newest_epoch(killed, run_id) == 1, "the kill came after epoch 2 had ended"
    _, run = only_run(store(killed))
    assert run.info.status == "RUNNING"  # SIGKILL left no chance to close it
    result = CliRunner().invoke(main, ["resume", run_id, "--tracking-uri", store(killed)])
    assert result.exit_code == 0, result.output
    assert "after epoch 1" in result.output

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
    assert newest_epoch(folder, run_id) == 2, "the kill came after epoch 3 had ended"
    list_checkpoints(folder / "dbx-checkpoints" / run_id)[-1].write_bytes(b"garbage")
    result = CliRunner().invoke(main, ["resume", run_id, "--tracking-uri", store(folder)])
    assert result.exit_code == 0, result.output
    assert "skipping damaged checkpoint" in result.output
    assert "after epoch 1" in result.output
    steps = [step for step, _ in histories(store(folder))["test_loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]


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


BAD_INPUTS = [
    # (what, spec text or None for no file, extra CLI args, a fragment of the message)
    ("spec file missing", None, [], "spec file not found"),
    ("malformed YAML", edit("epochs: 2", "epochs: [2"), [], "invalid YAML at line"),
    ("unknown key", edit("epochs: 2", "epochs: 2\nepocs: 3"), [], "unknown key 'epocs'. Did you mean 'epochs'?"),
    ("wrong type", edit("epochs: 2", "epochs: two"), [], "epochs"),
    ("batch size <= 0", edit("initial: 8", "initial: 0"), [], "initial must be a positive integer"),
    ("max below initial", edit("max: 64", "max: 4"), [], "max (4) must be at least initial (8)"),
    ("lr <= 0", edit("lr: 0.1", "lr: 0"), [], "optimizer.lr"),
    ("epochs <= 0", edit("epochs: 2", "epochs: 0"), [], "epochs"),
    ("target accuracy above 1", TINY + "target_accuracy: 1.5\n", [], "target_accuracy"),
    ("unknown plugin", edit("name: logreg", "name: logistic"), [], "unknown model 'logistic'"),
    ("plugin raising on construction", edit("resize_every: 1", "resize_every: 1, delta: -1.0"), [],
     "delta must be a finite number > 0"),
    ("dataset root missing", edit("{name: synthetic_logistic, params: {n: 300, d: 4}}",
                                  "{name: mnist, root: /nonexistent/data}"), [], "/nonexistent/data"),
    ("CUDA asked for and absent", TINY, ["--device", "cuda:99"], "cuda:99"),
    ("tracking server unreachable", TINY, ["--tracking-uri", "http://127.0.0.1:9"], "cannot be reached"),
    ("tracking store unwritable", TINY, ["--tracking-uri", "sqlite:////nonexistent/folder/mlflow.db"], "does not exist"),
    ("--set on a key that does not exist", TINY, ["--set", "optimizer.learning_rate=0.1"], "learning_rate"),
]


@pytest.mark.parametrize("what, text, args, fragment", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_answered_with_exit_2_and_starts_nothing(tmp_path, monkeypatch, what, text, args, fragment):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = tmp_path / "spec.yaml"
    if text is not None:
        spec.write_text(text)
    result = CliRunner().invoke(main, ["run", str(spec), *args])
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert len(result.output.strip().splitlines()) <= 3, "a message, not a traceback"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["spec.yaml"] if text is not None else [])


def test_resuming_a_run_that_does_not_exist_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["resume", "0123456789abcdef", "--tracking-uri", store(tmp_path)])
    assert result.exit_code == 2 and "no MLflow store" in result.output
    assert list(tmp_path.iterdir()) == []


def test_resuming_an_unknown_run_or_a_finished_one_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write(tmp_path, TINY + "checkpoint: {enabled: false}\n")
    assert CliRunner().invoke(main, ["run", str(spec)]).exit_code == 0
    _, run = only_run(store(tmp_path))

    result = CliRunner().invoke(main, ["resume", "0123456789abcdef"])
    assert result.exit_code == 2 and "no run '0123456789abcdef'" in result.output

    result = CliRunner().invoke(main, ["resume", run.info.run_id])
    assert result.exit_code == 2 and "has finished; there is nothing to resume" in result.output
    _, unchanged = only_run(store(tmp_path))
    assert unchanged.info.status == "FINISHED"


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


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_marks_the_run_killed_and_it_can_be_resumed(tmp_path, stop):
    folder = tmp_path / "run"
    spec = write(folder, SLOW.replace("epochs: 6", "epochs: 3"))
    log = open(folder / "run.log", "w")
    # a shell's background job inherits an ignored SIGINT (Python then keeps ignoring it): restore it
    process = subprocess.Popen([sys.executable, "-m", "dbx.cli", "run", str(spec), "--tracking-uri", store(folder)],
                               stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while not list(folder.glob("dbx-checkpoints/*/epoch-0001.ckpt")):
        assert process.poll() is None and time.monotonic() < deadline, (folder / "run.log").read_text()
        time.sleep(0.05)
    process.send_signal(stop)
    assert process.wait(timeout=120) == 130, (folder / "run.log").read_text()
    assert "marked KILLED" in (folder / "run.log").read_text()
    client, run = only_run(store(folder))
    assert run.info.status == "KILLED"
    assert run.data.tags["dbx.failure.reason"] == "interrupted"

    result = CliRunner().invoke(main, ["resume", run.info.run_id, "--tracking-uri", store(folder)])
    assert result.exit_code == 0, result.output
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_loss")] == [1, 2, 3]
    assert only_run(store(folder))[1].info.status == "FINISHED"


def test_an_exception_in_a_plugin_fails_the_run_with_the_reason(tmp_path, monkeypatch):
    """A model (from a tiny real distribution) that breaks in its second epoch."""
    from dbx import registry

    site = tmp_path / "site"
    info = site / "flaky_model-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flaky-model\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dbx.models]\nflaky = flaky_model_mod:flaky\n")
    (site / "flaky_model_mod.py").write_text(textwrap.dedent("""
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
        """))
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    monkeypatch.chdir(tmp_path)
    try:
        spec = write(tmp_path, edit("name: logreg", "name: flaky").replace(
            "{name: divebatch, params: {initial: 8, max: 64, resize_every: 1}}", "{name: fixed, params: {batch_size: 8}}"))
        result = CliRunner().invoke(main, ["run", str(spec)])
    finally:
        registry.refresh()
    assert result.exit_code == 1, result.output
    assert "RuntimeError: the flaky layer broke" in result.output
    _, run = only_run(store(tmp_path))
    assert run.info.status == "FAILED"
    assert run.data.tags["dbx.failure.reason"] == "exception"
    assert "the flaky layer broke" in run.data.tags["dbx.failure.message"]

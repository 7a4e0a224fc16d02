"""Checkpoints under faults: a folder that cannot hold them is refused before the run starts, a
write that fails (a full disk, a file-size limit) fails the run with a message and the right
epoch and leaves no temporary file, temporaries of killed writers are cleaned up, and the
earlier checkpoints stay intact throughout."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from dbx.cli import main
from dbx.train.checkpoint import list_checkpoints, read_checkpoint, remove_stale_temporaries, save_checkpoint

SPEC = """\
name: ckpt
device: cpu
data: {name: synthetic_logistic, params: {n: 200, d: 64}}
model: {name: mlp, params: {widths: [256]}}
optimizer: {lr: 0.1, momentum: 0.9}
epochs: 3
policy: {name: fixed, params: {batch_size: 50}}
checkpoint: {keep_last: 1, dir: CKPT}
tracking: {system_metrics: false}
"""


def write_spec(folder, checkpoint_dir):
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.replace("CKPT", str(checkpoint_dir)))
    return spec


def run(folder, *args):
    return CliRunner().invoke(main, ["run", str(folder / "spec.yaml"), "--tracking-uri",
                                     f"sqlite:///{folder / 'mlflow.db'}", *args])


def only_run(folder):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    [found] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return found


def dead_pid():
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("case, message", [
    ("a file", "is a file, not a folder"),
    ("below a file", "cannot be created: {file} is a file, not a folder"),
    ("unwritable", "cannot be written"),
])
def test_a_checkpoint_dir_that_cannot_hold_checkpoints_is_refused_before_the_run(tmp_path, case, message):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    target = {"a file": blocker, "below a file": blocker / "sub", "unwritable": "/proc/dbx-checkpoints"}[case]
    write_spec(tmp_path, target)
    result = run(tmp_path)
    assert result.exit_code == 2, result.output
    assert f"checkpoint folder {target}" in result.output
    assert message.format(file=blocker) in result.output
    assert "checkpoint: {enabled: false}" in result.output
    assert len(result.output.strip().splitlines()) <= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "spec.yaml"]  # no store, no run
    assert blocker.read_text() == "keep me"


def test_a_temporary_file_of_a_killed_write_is_removed_by_the_next_save(tmp_path):
    save_checkpoint(tmp_path, 1, {"epoch": 1}, keep_last=5)
    killed = tmp_path / f".epoch-0002.ckpt.{dead_pid()}.tmp"
    killed.write_bytes(b"half a checkpoint")
    live = tmp_path / f".epoch-0002.ckpt.{os.getppid()}.tmp"  # another process, still writing
    live.write_bytes(b"in progress")
    save_checkpoint(tmp_path, 2, {"epoch": 2}, keep_last=5)
    assert not killed.exists() and live.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0001.ckpt", "epoch-0002.ckpt"]
    assert remove_stale_temporaries(tmp_path) == []  # the live writer's file is never taken


FAILING_WRITE = """\
import resource, signal, sys
import torch
from dbx.train.checkpoint import save_checkpoint

folder = sys.argv[1]
save_checkpoint(folder, 1, {"weights": torch.zeros(10)}, keep_last=1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
try:
    save_checkpoint(folder, 2, {"weights": torch.zeros(100_000)}, keep_last=1)
except OSError as exc:
    print("failed:", exc.strerror)
"""


def test_a_write_that_fails_leaves_no_temporary_file_and_the_earlier_checkpoint_intact(tmp_path):
    result = subprocess.run([sys.executable, "-c", FAILING_WRITE, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "failed: File too large" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-0001.ckpt"]
    assert torch.equal(read_checkpoint(tmp_path / "epoch-0001.ckpt")["weights"], torch.zeros(10))


def test_resume_removes_what_a_killed_checkpoint_write_left(tmp_path):
    write_spec(tmp_path, tmp_path / "ckpt")
    (tmp_path / "spec.yaml").write_text((tmp_path / "spec.yaml").read_text().replace("keep_last: 1", "keep_last: 5"))
    assert run(tmp_path).exit_code == 0
    finished = only_run(tmp_path)
    folder = tmp_path / "ckpt" / finished.info.run_id
    (folder / "epoch-0003.ckpt").unlink()  # killed while writing epoch 3's checkpoint:
    (folder / f".epoch-0003.ckpt.{dead_pid()}.tmp").write_bytes(b"half a checkpoint")
    result = CliRunner().invoke(main, ["resume", finished.info.run_id, "--tracking-uri",
                                       f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 0, result.output
    assert "left by a checkpoint write that never finished" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0001.ckpt", "epoch-0002.ckpt", "epoch-0003.ckpt"]


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: room for one checkpoint of SPEC's model (160 KB), not for two."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs (CI runs as root); "
                    "test_a_write_that_fails_leaves_no_temporary_file... covers the write itself")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_checkpoint_disk_fails_the_run_at_the_right_epoch_and_leaves_no_temporary(tmp_path, small_disk):
    write_spec(tmp_path, small_disk)
    result = run(tmp_path)
    assert result.exit_code == 1, result.output
    assert "could not write the checkpoint of epoch 2" in result.output and "No space left on device" in result.output
    failed = only_run(tmp_path)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["dbx.failure.reason"] == "checkpoint_failed"
    assert failed.data.tags["dbx.failure.epoch"] == "2"
    [folder] = small_disk.iterdir()
    assert [p.name for p in folder.iterdir()] == ["epoch-0001.ckpt"]  # intact, and no .tmp
    assert read_checkpoint(folder / "epoch-0001.ckpt")["state"]["epoch"] == 1
    assert "dbx resume" in result.output and "after epoch 1" in result.output


def test_a_resumed_run_continues_from_the_checkpoint_the_full_disk_left(tmp_path, small_disk):
    write_spec(tmp_path, small_disk)
    assert run(tmp_path).exit_code == 1
    failed = only_run(tmp_path)
    # the user makes room (here: checkpoints elsewhere would do too; the tmpfs is grown)
    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)
    result = CliRunner().invoke(main, ["resume", failed.info.run_id, "--tracking-uri",
                                       f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 0, result.output
    assert "after epoch 1" in result.output
    assert only_run(tmp_path).info.status == "FINISHED"
    assert textwrap.dedent(result.output).count("epoch 3/3") == 1


def test_a_sweep_with_an_unwritable_checkpoint_dir_starts_no_parent_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    spec = write_spec(tmp_path, blocker)
    spec.write_text(spec.read_text() + "sweep: {seed: [0, 1]}\n")
    result = run(tmp_path)
    assert result.exit_code == 2, result.output
    assert f"checkpoint folder {blocker} is a file, not a folder" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "spec.yaml"]


def test_a_policy_state_that_a_checkpoint_cannot_hold_fails_the_run_at_epoch_1_naming_it(site, tmp_path):
    from distributions import install

    from dbx import registry

    install(site, "sets-policy", "[dbx.policies]\nsets = sets_mod:KeepsASet\n", {"sets_mod": """
        class KeepsASet:
            uses_diversity = False

            def __init__(self, *, batch_size: int = 50) -> None:
                self.batch_size, self.seen = batch_size, set()

            def initial_batch_size(self) -> int:
                return self.batch_size

            def measures_in(self, epoch: int) -> bool:
                return False

            def next_batch_size(self, state, diversity) -> int:
                self.seen.add(state.epoch)
                return self.batch_size

            def state_dict(self):
                return {"seen": self.seen}

            def load_state_dict(self, state) -> None:
                self.seen = set(state["seen"])
        """})
    registry.refresh()
    write_spec(tmp_path, tmp_path / "ckpt")
    (tmp_path / "spec.yaml").write_text((tmp_path / "spec.yaml").read_text().replace(
        "{name: fixed, params: {batch_size: 50}}", "{name: sets}"))
    result = run(tmp_path)
    assert result.exit_code == 1, result.output
    assert ("could not checkpoint epoch 1: policy 'sets''s state_dict() is not plain data that a checkpoint can "
            "hold (Object of type set is not JSON serializable)") in result.output
    failed = only_run(tmp_path)
    assert failed.data.tags["dbx.failure.reason"] == "checkpoint_failed"
    assert failed.data.tags["dbx.failure.epoch"] == "1"

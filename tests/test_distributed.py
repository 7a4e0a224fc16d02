"""The same spec under torchrun: 2 CPU processes (gloo) train like one process on the same global
batches, log one MLflow run, fail as one job when a rank fails, and resume on another number of
processes. Every multi-process run here is a real torchrun job (``dbx run --nproc 2``)."""
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from click.testing import CliRunner
from distributions import install
from mlflow import MlflowClient

from dbx import registry
from dbx.cli import main
from dbx.data.loader import make_loader, shard
from dbx.train.checkpoint import list_checkpoints, read_checkpoint

# 203 samples: no batch size of the run divides it evenly, so every epoch ends with a partial
# batch, and odd batch sizes give the two ranks slices of different sizes. max_micro_batch 7
# makes each rank accumulate several micro-batches (DDP's no_sync) once B grows.
SPEC = """\
name: ddp
seed: 1
device: cpu
data: {name: synthetic_logistic, params: {n: 203, d: 6}}
model: {name: mlp, params: {widths: [16]}}
optimizer: {lr: 0.1, momentum: 0.9}
epochs: 4
max_micro_batch: 7
policy: {name: divebatch, params: {initial: 9, max: 64, delta: 0.5, resize_every: 1}}
tracking: {system_metrics: false}
"""
CURVES = ["diversity", "batch_size", "train_loss", "test_loss", "sum_sq_norms", "sq_norm_of_sum", "samples_seen",
          "optimizer_steps", "lr"]


def store(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def write_spec(folder: Path, text: str = SPEC) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def dbx_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dbx", *args]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def runs_of(uri: str) -> list:
    client = MlflowClient(uri)
    return [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]


def curves(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(uri)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in CURVES}


def final_weights(uri: str, run_id: str) -> dict[str, torch.Tensor]:
    folder = MlflowClient(uri).get_run(run_id).data.tags["dbx.checkpoint.dir"]
    return read_checkpoint(list_checkpoints(folder)[-1])["model"]


def assert_same_curves(got: dict, expected: dict) -> None:
    for key in CURVES:
        assert [step for step, _ in got[key]] == [step for step, _ in expected[key]], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in expected[key]], rel=1e-5), key


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The spec trained by one process (in this one) and by a 2-process torchrun job."""
    folder = tmp_path_factory.mktemp("ddp")
    spec = write_spec(folder / "spec")
    one = CliRunner().invoke(main, ["run", str(spec), "--tracking-uri", store(folder / "one")])
    assert one.exit_code == 0, one.output
    two = subprocess.run(dbx_command("run", str(spec), "--nproc", "2", "--tracking-uri", store(folder / "two")),
                         capture_output=True, text=True, env=environment(), timeout=300)
    assert two.returncode == 0, (two.stdout + two.stderr)[-6000:]
    [run_one] = runs_of(store(folder / "one"))
    runs = runs_of(store(folder / "two"))
    return folder, spec, run_one, runs, two.stdout


def test_two_processes_log_one_run_that_says_how_it_was_spread(one_and_two):
    _, _, _, runs, output = one_and_two
    assert len(runs) == 1  # rank 1 logs nothing
    [run] = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["dbx.world_size"] == "2" and run.data.tags["dbx.backend"] == "gloo"
    assert run.data.tags["dbx.rank_devices"].count(":cpu") == 2
    assert run.data.params["dbx.world_size"] == "2"
    assert output.count("epoch 4/4") == 1  # rank 0 alone prints


def test_two_processes_train_as_one_on_the_same_global_batches(one_and_two):
    folder, _, run_one, [run_two], _ = one_and_two
    one, two = curves(store(folder / "one"), run_one.info.run_id), curves(store(folder / "two"), run_two.info.run_id)
    assert [v for _, v in one["batch_size"]] == [9.0, 22.0, 46.0, 52.0]  # the policy did resize, every epoch
    assert_same_curves(two, one)
    weights_one = final_weights(store(folder / "one"), run_one.info.run_id)
    weights_two = final_weights(store(folder / "two"), run_two.info.run_id)
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_killed_two_process_job_resumes_on_one_process_and_continues_the_same_curves(one_and_two, tmp_path):
    folder, spec, _, [uninterrupted], _ = one_and_two
    held = tmp_path / "held"
    job = subprocess.Popen(dbx_command("run", str(spec), "--nproc", "2", "--tracking-uri", store(tmp_path)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                           env=environment(DBX_HOLD_AT="checkpoint:2", DBX_HOLD_FILE=str(held)))
    try:
        deadline = time.monotonic() + 240
        while not held.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert held.exists(), "the job never reached epoch 2's checkpoint"
    finally:
        kill_job(job)
    [killed] = runs_of(store(tmp_path))
    assert killed.info.status == "RUNNING"
    resumed = CliRunner().invoke(main, ["resume", killed.info.run_id, "--tracking-uri", store(tmp_path)])
    assert resumed.exit_code == 0, resumed.output
    [run] = runs_of(store(tmp_path))
    assert run.info.status == "FINISHED"
    assert_same_curves(curves(store(tmp_path), run.info.run_id),
                       curves(store(folder / "two"), uninterrupted.info.run_id))


def test_killed_one_process_run_resumes_on_two_processes(one_and_two, tmp_path):
    folder, spec, alone, _, _ = one_and_two
    held = tmp_path / "held"
    job = subprocess.Popen(dbx_command("run", str(spec), "--tracking-uri", store(tmp_path)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=environment(DBX_HOLD_AT="checkpoint:1", DBX_HOLD_FILE=str(held)))
    try:
        deadline = time.monotonic() + 240
        while not held.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert held.exists(), "the run never reached epoch 1's checkpoint"
    finally:
        kill_job(job)
    [killed] = runs_of(store(tmp_path))
    resumed = subprocess.run(dbx_command("resume", killed.info.run_id, "--nproc", "2", "--tracking-uri",
                                         store(tmp_path)), capture_output=True, text=True, env=environment(),
                             timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-6000:]
    assert "2 processes" in resumed.stdout
    [run] = runs_of(store(tmp_path))
    assert run.info.status == "FINISHED" and run.data.tags["dbx.world_size"] == "2"
    assert_same_curves(curves(store(tmp_path), run.info.run_id), curves(store(folder / "one"), alone.info.run_id))


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL every process of the job: dbx's launcher, torchrun, and the ranks (which torchrun
    starts in sessions of their own)."""
    processes = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)
    job.wait()


FAILING = '''
import os
import time

import torch
from torch import nn
from torch.nn import functional as F


class ReusesItsWeight(nn.Module):
    """fc's weight also used outside fc's forward: the layer hooks cannot see that use."""

    def __init__(self, inputs: int, classes: int) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(inputs, 16), nn.Linear(16, classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(torch.relu(self.fc(x)) + 0.5 * F.linear(x, self.fc.weight))


def reuses_weight(*, num_classes, input_shape):
    return ReusesItsWeight(input_shape[0], num_classes)


def bn_mlp(*, num_classes, input_shape, width: int = 16):
    """Linear -> BatchNorm1d -> ReLU -> Linear."""
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Linear(width, num_classes))


class FailsOnRankOne:
    """DiveBatch's interface, a fixed batch size, and an error on rank 1 in epoch 2."""

    uses_diversity = False

    def __init__(self, *, initial: int = 8, marker: str = "") -> None:
        self.initial, self.marker = initial, marker

    def initial_batch_size(self) -> int:
        return self.initial

    def measures_in(self, epoch: int) -> bool:
        return False

    def next_batch_size(self, state, diversity) -> int:
        if state.epoch == 2 and os.environ.get("RANK") == "1":
            with open(self.marker, "w") as handle:
                handle.write(str(time.time()))
            raise RuntimeError("rank one cannot go on")
        return state.batch_size

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass
'''


def install_failing(site: Path) -> None:
    install(site, "failing-policy", "[dbx.policies]\nfails_on_rank_one = failing_policy:FailsOnRankOne\n"
                                    "[dbx.models]\nbn_mlp = failing_policy:bn_mlp\n"
                                    "reuses_weight = failing_policy:reuses_weight\n", {"failing_policy": FAILING})


def test_the_estimators_self_check_works_under_ddp(site, tmp_path, one_and_two):
    """The self-check compares each rank's own gradient (not DDP's all-reduced one) with the hooks'
    sums: the runs above pass it, and a model that uses a weight outside its module is caught."""
    install_failing(site)
    spec = write_spec(tmp_path / "spec", SPEC.replace("model: {name: mlp, params: {widths: [16]}}",
                                                      "model: {name: reuses_weight}"))
    job = subprocess.run(dbx_command("run", str(spec), "--nproc", "2", "--tracking-uri", store(tmp_path)),
                         capture_output=True, text=True, env=environment(PYTHONPATH=str(site)), timeout=300)
    assert job.returncode == 1, (job.stdout + job.stderr)[-6000:]
    [run] = runs_of(store(tmp_path))
    assert run.info.status == "FAILED"
    message = run.data.tags["dbx.failure.message"]
    assert "self-check" in message and "'fc.weight'" in message and message.startswith("rank "), message


def test_a_rank_that_raises_ends_the_job_and_the_run_says_which_rank_and_why(site, tmp_path):
    """A third-party policy and model from a (tiny, real) distribution run under torchrun as they
    are (the model has BatchNorm: per-rank statistics); when the policy raises on rank 1, rank 0
    closes the run FAILED naming rank 1, and torchrun exits 1."""
    install_failing(site)
    registry.refresh()
    marker = tmp_path / "raised"
    spec = write_spec(tmp_path / "spec", SPEC.replace(
        "policy: {name: divebatch, params: {initial: 9, max: 64, delta: 0.5, resize_every: 1}}",
        f"policy: {{name: fails_on_rank_one, params: {{initial: 17, marker: {str(marker)!r}}}}}").replace(
        "model: {name: mlp, params: {widths: [16]}}", "model: {name: bn_mlp}").replace(
        "max_micro_batch: 7", "max_micro_batch: 64"))  # BatchNorm needs 2+ samples: slices of 9 and 8, last 5 and 4
    job = subprocess.Popen(dbx_command("run", str(spec), "--nproc", "2", "--tracking-uri", store(tmp_path)),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=environment(PYTHONPATH=str(site)))
    try:
        output, _ = job.communicate(timeout=300)
    finally:
        job.kill()
    assert marker.exists(), output
    raised = float(marker.read_text())
    assert job.returncode == 1, output[-6000:]
    [run] = runs_of(store(tmp_path))
    assert run.info.status == "FAILED"
    assert run.data.tags["dbx.failure.rank"] == "1"
    assert "rank 1" in run.data.tags["dbx.failure.message"]
    assert "rank one cannot go on" in run.data.tags["dbx.failure.message"]
    assert run.info.end_time / 1000 - raised < 30  # closed within seconds of the error, no hang
    logged = [m.step for m in MlflowClient(store(tmp_path)).get_metric_history(run.info.run_id, "test_loss")]
    assert logged[:1] == [1] and set(logged) <= {1, 2}  # epoch 1 trained; rank 0 may have logged epoch 2


def test_ranks_slice_each_global_batch_of_one_permutation():
    """The loader's slices of 2 ranks put together are the one-process batches, in order."""
    inputs, targets = torch.arange(23.0).view(23, 1), torch.arange(23)
    alone = make_loader((inputs, targets), batch_size=5, shuffle=True, device="cpu", seed=4)
    ranks = [make_loader((inputs, targets), batch_size=5, shuffle=True, device="cpu", seed=4, rank=r, world_size=2)
             for r in range(2)]
    for (_, whole), (_, first), (_, second) in zip(alone, *ranks, strict=True):
        assert torch.equal(torch.cat([first, second]), whole)
        assert len(first) - len(second) in (0, 1)
    assert [shard(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert len(ranks[0]) == len(alone) == 5


def test_dataset_ranks_slice_each_global_batch_as_the_dataloader_orders_it_alone():
    """The DataLoader path: each rank's batches are its slices of the one-process batches."""
    dataset = torch.utils.data.TensorDataset(torch.arange(23.0).view(23, 1), torch.arange(23))
    alone = make_loader(dataset, batch_size=6, shuffle=True, device="cpu", seed=4, num_workers=0)
    ranks = [make_loader(dataset, batch_size=6, shuffle=True, device="cpu", seed=4, num_workers=0, rank=r,
                         world_size=2) for r in range(2)]
    for _ in range(2):  # two epochs: the generators advance alike
        for (_, whole), (_, first), (_, second) in zip(alone, *ranks, strict=True):
            assert torch.equal(torch.cat([first, second]), whole)
    reference = torch.utils.data.DataLoader(dataset, batch_size=6, shuffle=True,
                                            generator=torch.Generator().manual_seed(4))
    ours = make_loader(dataset, batch_size=6, shuffle=True, device="cpu", seed=4, num_workers=0)
    assert [t.tolist() for _, t in ours] == [t.tolist() for _, t in reference]  # torch's own order, unchanged


def test_a_wrong_spec_is_refused_before_torchrun_starts(tmp_path):
    spec = write_spec(tmp_path, SPEC.replace("epochs: 4", "epochs: -4"))
    result = CliRunner().invoke(main, ["run", str(spec), "--nproc", "2", "--tracking-uri", store(tmp_path / "s")])
    assert result.exit_code == 2 and "epochs" in result.output, result.output
    assert not (tmp_path / "s" / "mlflow.db").exists()  # nothing was started


def test_the_meter_in_your_own_ddp_loop_refuses_rather_than_mixing_one_ranks_norms_with_the_average(tmp_path):
    script = tmp_path / "own_loop.py"
    script.write_text(textwrap.dedent("""\
        import torch
        import torch.distributed as dist
        import dbx
        from dbx.meter import MeterError

        dist.init_process_group("gloo")
        meter = dbx.DiversityMeter(torch.nn.Linear(4, 2))
        try:
            meter.start()
        except MeterError as error:
            print(f"rank {dist.get_rank()} refused: {error}")
        dist.destroy_process_group()
        """))
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert job.returncode == 0, job.stderr[-2000:]
    assert job.stdout.count("refused:") == 2 and "world size 2" in job.stdout and "dbx run --nproc N" in job.stdout

"""Every bad input and broken store a user can meet, as one table: each case runs a dbx command
in a folder prepared for it and checks the exit code (2: the input is wrong), a message of one or
two lines that names the problem, and that nothing in the folder was created, changed or lost
(the store file included, byte for byte).

Two faults that need real processes or a real small disk follow the table: eight `dbx run`s
started at once on a fresh store, and a store on a full disk.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from dbx.cli import main

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


def closed_port() -> int:
    """A local port that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def chattr(flag: str, *paths: Path) -> None:
    """``chattr +i``: immutable even for root (a chmod does not stop root). Skips where unsupported."""
    done = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr {flag} is not supported here: {done.stderr.strip()}")


def read_only(path: Path) -> None:
    path.chmod(0o555 if path.is_dir() else 0o444)
    if os.geteuid() == 0:
        chattr("+i", path)


def garbage_store(folder: Path) -> None:
    (folder / "mlflow.db").write_bytes(b"this is not a database\n" * 50)


def store_is_a_folder(folder: Path) -> None:
    shutil.rmtree(folder / "mlflow.db", ignore_errors=True)
    (folder / "mlflow.db").unlink(missing_ok=True)
    (folder / "mlflow.db").mkdir()


def immutable_store(folder: Path) -> None:
    read_only(folder / "mlflow.db")


def run_is_running_here(folder: Path) -> None:
    """The finished run, as if this very process were still driving it."""
    from dbx.liveness import process_tags

    client, run_id = MlflowClient(tracking_uri=uri_of(folder)), run_id_of(folder)
    for key, value in process_tags().items():
        client.set_tag(run_id, key, value)
    client.update_run(run_id, status="RUNNING")


def run_is_running_elsewhere(folder: Path) -> None:
    client, run_id = MlflowClient(tracking_uri=uri_of(folder)), run_id_of(folder)
    client.set_tag(run_id, "dbx.host", "gpu-node-7")
    client.update_run(run_id, status="RUNNING")


def run_is_killed(folder: Path) -> None:
    MlflowClient(tracking_uri=uri_of(folder)).set_terminated(run_id_of(folder), status="KILLED")


def busy_port(folder: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    BUSY.append(listener)
    (folder / "port").write_text(str(listener.getsockname()[1]))


BUSY: list[socket.socket] = []


def uri_of(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def run_id_of(folder: Path) -> str:
    return (folder / "run_id").read_text()


@dataclass
class Case:
    """``args`` may hold {spec}, {uri} (the case's store), {run} (its finished run), {dir} (the
    case folder), {port} (written by the setup) and {closed} (a local port nothing listens on)."""

    what: str
    args: list[str]
    fragment: str
    spec: str | None = TINY
    store: bool = False  # start from a copy of a store holding one finished run of TINY
    setup: Callable[[Path], None] | None = None
    code: int = 2
    marks: list = field(default_factory=list)


RUN = ["run", "{spec}"]
CASES = [
    # the spec and its plugins
    Case("spec file missing", RUN, "spec file not found", spec=None),
    Case("malformed YAML", RUN, "invalid YAML at line", spec=edit("epochs: 2", "epochs: [2")),
    Case("unknown key", RUN, "unknown key 'epocs'. Did you mean 'epochs'?", spec=edit("epochs: 2", "epochs: 2\nepocs: 3")),
    Case("wrong type", RUN, "epochs", spec=edit("epochs: 2", "epochs: two")),
    Case("batch size <= 0", RUN, "initial must be a positive integer", spec=edit("initial: 8", "initial: 0")),
    Case("max below initial", RUN, "max (4) must be at least initial (8)", spec=edit("max: 64", "max: 4")),
    Case("lr <= 0", RUN, "optimizer.lr", spec=edit("lr: 0.1", "lr: 0")),
    Case("epochs <= 0", RUN, "epochs", spec=edit("epochs: 2", "epochs: 0")),
    Case("target accuracy above 1", RUN, "target_accuracy", spec=TINY + "target_accuracy: 1.5\n"),
    Case("unknown plugin", RUN, "unknown model 'logistic'", spec=edit("name: logreg", "name: logistic")),
    Case("plugin raising on construction", RUN, "delta must be a finite number > 0",
         spec=edit("resize_every: 1", "resize_every: 1, delta: -1.0")),
    Case("dataset root missing", RUN, "/nonexistent/data",
         spec=edit("{name: synthetic_logistic, params: {n: 300, d: 4}}", "{name: mnist, root: /nonexistent/data}")),
    Case("CUDA asked for and absent", [*RUN, "--device", "cuda:99"], "cuda:99"),
    Case("--set on a key that does not exist", [*RUN, "--set", "optimizer.learning_rate=0.1"], "learning_rate"),
    # the tracking store, for `dbx run`
    Case("tracking server unreachable", [*RUN, "--tracking-uri", "http://127.0.0.1:9"], "cannot be reached"),
    Case("tracking server on a closed local port", [*RUN, "--tracking-uri", "http://127.0.0.1:{closed}"],
         "tracking server http://127.0.0.1:"),
    Case("tracking store folder missing", [*RUN, "--tracking-uri", "sqlite:////nonexistent/folder/mlflow.db"],
         "does not exist"),
    Case("tracking store folder immutable", [*RUN, "--tracking-uri", "sqlite:///{dir}/ro/mlflow.db"], "is not writable",
         setup=lambda d: ((d / "ro").mkdir(), read_only(d / "ro"))),
    Case("tracking store is a plain folder (a file store)", [*RUN, "--tracking-uri", "{dir}/runs"],
         "MLflow 3 no longer writes folder stores", setup=lambda d: (d / "runs").mkdir()),
    Case("mlflow.db is garbage", [*RUN, "--tracking-uri", "{uri}"], "is not an SQLite database", setup=garbage_store),
    Case("mlflow.db is immutable", [*RUN, "--tracking-uri", "{uri}"], "cannot be written", store=True,
         setup=immutable_store),
    Case("mlflow.db is a folder", [*RUN, "--tracking-uri", "{uri}"], "is a folder, not a database file",
         setup=store_is_a_folder),
    # dbx resume
    Case("resume: no store", ["resume", "0123456789abcdef", "--tracking-uri", "{uri}"], "no MLflow store", spec=None),
    Case("resume: unknown run", ["resume", "0123456789abcdef", "--tracking-uri", "{uri}"],
         "no run '0123456789abcdef'", store=True),
    Case("resume: a finished run", ["resume", "{run}", "--tracking-uri", "{uri}"], "has finished", store=True),
    Case("resume: a finished run without checkpoints", ["resume", "{run}", "--tracking-uri", "{uri}"], "has finished",
         store=True, setup=lambda d: shutil.rmtree(d / "dbx-checkpoints")),
    Case("resume: a run whose process is alive", ["resume", "{run}", "--tracking-uri", "{uri}"],
         "is still running (pid", store=True, setup=run_is_running_here),
    Case("resume: a run RUNNING on another machine", ["resume", "{run}", "--tracking-uri", "{uri}"],
         "resume with --force", store=True, setup=run_is_running_elsewhere),
    Case("resume: absent CUDA device", ["resume", "{run}", "--tracking-uri", "{uri}", "--device", "cuda:99"],
         "cuda:99", store=True, setup=run_is_killed),
    Case("resume: tracking server on a closed local port", ["resume", "{run}", "--tracking-uri",
         "http://127.0.0.1:{closed}"], "cannot be reached", store=True),
    Case("resume: mlflow.db is garbage", ["resume", "0123456789abcdef", "--tracking-uri", "{uri}"],
         "is not an SQLite database", setup=garbage_store),
    Case("resume: mlflow.db is immutable", ["resume", "{run}", "--tracking-uri", "{uri}"], "cannot be written",
         store=True, setup=immutable_store),
    # dbx compare
    Case("compare: no store", ["compare", "--tracking-uri", "{uri}"], "there is no MLflow store"),
    Case("compare: tracking server on a closed local port", ["compare", "--tracking-uri", "http://127.0.0.1:{closed}"],
         "cannot be reached"),
    Case("compare: mlflow.db is garbage", ["compare", "--tracking-uri", "{uri}"], "is not an SQLite database",
         setup=garbage_store),
    Case("compare: mlflow.db is a folder", ["compare", "--tracking-uri", "{uri}"], "is a folder, not a database file",
         setup=store_is_a_folder),
    Case("compare: --group-by an unknown tag", ["compare", "--tracking-uri", "{uri}", "--experiment", "tiny",
         "--group-by", "tags.nonexistent"], "--group-by tags.nonexistent: no run here has the tag", store=True),
    Case("compare: --group-by a misspelt param", ["compare", "--tracking-uri", "{uri}", "--experiment", "tiny",
         "--group-by", "policy.nam"], "Did you mean policy.name", store=True),
    Case("compare: --plot into a read-only folder", ["compare", "--tracking-uri", "{uri}", "--experiment", "tiny",
         "--plot", "{dir}/ro/curves.png"], "is not writable", store=True,
         setup=lambda d: ((d / "ro").mkdir(), read_only(d / "ro"))),
    Case("compare: --plot with an unknown extension", ["compare", "--tracking-uri", "{uri}", "--experiment", "tiny",
         "--plot", "{dir}/curves.xyz"], "unknown image type .xyz", store=True),
    Case("compare: --plot into a missing folder", ["compare", "--tracking-uri", "{uri}", "--experiment", "tiny",
         "--plot", "{dir}/nowhere/curves.png"], "does not exist", store=True),
    Case("compare: --experiment and --parent", ["compare", "--experiment", "a", "--parent", "b"], "not both"),
    # dbx ui and dbx runs
    Case("ui: --port 99999", ["ui", "--tracking-uri", "{uri}", "--port", "99999"], "is not a port number", store=True),
    Case("ui: a busy port", ["ui", "--tracking-uri", "{uri}", "--port", "{port}"], "is in use", store=True,
         setup=busy_port),
    Case("ui: mlflow.db is garbage", ["ui", "--tracking-uri", "{uri}"], "is not an SQLite database",
         setup=garbage_store),
    Case("runs: no store", ["runs", "--tracking-uri", "{uri}"], "there is no MLflow store"),
    Case("runs: unknown experiment", ["runs", "--tracking-uri", "{uri}", "--experiment", "nope"],
         "no experiment 'nope'", store=True),
    Case("runs --stale: mlflow.db is garbage", ["runs", "--stale", "--tracking-uri", "{uri}"],
         "is not an SQLite database", setup=garbage_store),
]


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory) -> Path:
    """A store holding one finished run of TINY (copied into the cases that start from one)."""
    folder = tmp_path_factory.mktemp("finished")
    (folder / "spec.yaml").write_text(TINY)
    result = CliRunner().invoke(main, ["run", str(folder / "spec.yaml"), "--tracking-uri", uri_of(folder)])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=uri_of(folder))
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (folder / "spec.yaml").unlink()
    return folder, run.info.run_id


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with a digest of its content (folders: "dir")."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.mark.parametrize("case", CASES, ids=[case.what for case in CASES])
def test_bad_input_is_answered_in_two_lines_with_exit_2_and_nothing_created_or_lost(case, tmp_path, monkeypatch,
                                                                                   finished_store):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_id = ""
    if case.store:
        source, run_id = finished_store
        shutil.copytree(source, tmp_path, dirs_exist_ok=True)
        (tmp_path / "run_id").write_text(run_id)
    if case.spec is not None:
        (tmp_path / "spec.yaml").write_text(textwrap.dedent(case.spec))
    try:
        if case.setup is not None:
            case.setup(tmp_path)
        port = (tmp_path / "port").read_text() if (tmp_path / "port").exists() else ""
        args = [a.format(spec=tmp_path / "spec.yaml", uri=uri_of(tmp_path), run=run_id, dir=tmp_path, port=port,
                         closed=closed_port()) for a in case.args]
        before = snapshot(tmp_path)
        result = CliRunner().invoke(main, args)
        assert result.exit_code == case.code, result.output
        assert case.fragment in result.output
        lines = result.output.strip().splitlines()
        assert 1 <= len(lines) <= 2, "one or two lines, not a traceback:\n" + result.output
        assert snapshot(tmp_path) == before, "the command created, changed or removed something"
    finally:
        while BUSY:
            BUSY.pop().close()
        subprocess.run(["chattr", "-R", "-i", str(tmp_path)], capture_output=True)
        for path in [tmp_path, *tmp_path.rglob("*")]:
            with contextlib.suppress(OSError):
                path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_store_in_a_read_only_folder_can_still_be_compared_and_listed(finished_store, tmp_path, monkeypatch):
    source, run_id = finished_store
    folder = tmp_path / "shared"
    shutil.copytree(source, folder)
    (folder / ".mlflow.db.lock").unlink(missing_ok=True)  # as a store another tool made
    read_only(folder)
    monkeypatch.chdir(tmp_path)
    try:
        before = snapshot(folder)
        listed = CliRunner().invoke(main, ["runs", "--tracking-uri", uri_of(folder)])
        assert listed.exit_code == 0 and run_id in listed.output, listed.output
        compared = CliRunner().invoke(main, ["compare", "--tracking-uri", uri_of(folder), "--experiment", "tiny",
                                             "--format", "csv"])
        assert compared.exit_code == 0, compared.output
        assert snapshot(folder) == before
    finally:
        subprocess.run(["chattr", "-R", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def test_the_table_has_the_cases_the_issue_asks_for():
    names = {case.what for case in CASES}
    assert len(CASES) >= 40 and len(names) == len(CASES)


# --------------------------------------------------------------------------------------------
# Real processes and a real full disk
# --------------------------------------------------------------------------------------------

PARALLEL = Path(__file__).with_name("parallel_runs.py")


def test_eight_runs_started_at_once_on_a_fresh_store_all_finish_with_every_metric(tmp_path):
    """What a user does to run a sweep's points in parallel. Before the store lock, MLflow's schema
    migration raced itself (`table _alembic_tmp_latest_metrics already exists`) and left the store
    unusable, and two runs could both create the experiment (`UNIQUE constraint failed`)."""
    (tmp_path / "spec.yaml").write_text(TINY)
    uri = uri_of(tmp_path)
    done = subprocess.run([sys.executable, str(PARALLEL), "8", uri, str(tmp_path / "spec.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.info.experiment_id for r in runs}) == 1
    for run in runs:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_loss")] == [1, 2]
        assert {"final_test_accuracy", "diversity", "batch_size"} <= set(run.data.metrics)

    ninth = CliRunner().invoke(main, ["run", str(tmp_path / "spec.yaml"), "--tracking-uri", uri])
    assert ninth.exit_code == 0, ninth.output  # and the store is not broken


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs root: mount); unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


BIG = edit("model: {name: logreg}", "model: {name: mlp, params: {widths: [256, 256]}}").replace(
    "{n: 300, d: 4}", "{n: 300, d: 256}")


def test_a_store_on_a_full_disk_fails_the_run_with_a_message_and_keeps_what_was_there(small_disk, monkeypatch):
    """An earlier run and its checkpoints are on the disk; then it fills up, and a run whose
    checkpoint does not fit fails (exit 1) with a message, FAILED, no .tmp left, nothing lost."""
    monkeypatch.chdir(small_disk)
    uri = uri_of(small_disk)
    (small_disk / "tiny.yaml").write_text(TINY)
    first = CliRunner().invoke(main, ["run", "tiny.yaml", "--tracking-uri", uri])
    assert first.exit_code == 0, first.output
    checkpoints = {p: p.read_bytes() for p in small_disk.glob("dbx-checkpoints/*/*.ckpt")}
    assert checkpoints
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 700 * 1024))  # 700 KiB left: the store fits, the checkpoint not

    (small_disk / "big.yaml").write_text(BIG)
    result = CliRunner().invoke(main, ["run", "big.yaml", "--tracking-uri", uri])
    assert result.exit_code == 1, result.output
    assert "could not write the checkpoint of epoch 1" in result.output and "No space left on device" in result.output
    assert "Traceback" not in result.output
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    big = [r for r in runs if r.data.params.get("model.name") == "mlp"]
    assert len(big) == 1 and big[0].info.status == "FAILED"
    assert big[0].data.tags["dbx.failure.reason"] == "checkpoint_failed"
    assert not list(small_disk.rglob("*.tmp")), "a partial checkpoint was left behind"
    assert {p: p.read_bytes() for p in small_disk.glob("dbx-checkpoints/*/*.ckpt")} == checkpoints
    tiny = [r for r in runs if r.data.params.get("model.name") == "logreg"]
    assert tiny[0].info.status == "FINISHED" and "final_test_accuracy" in tiny[0].data.metrics

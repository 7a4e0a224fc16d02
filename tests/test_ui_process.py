"""`dbx ui` as processes: SIGTERM, SIGINT or SIGHUP to it stops the MLflow server and every worker
it started (nothing keeps the port), and a bad port is refused before anything starts."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def port_is_free(port: int) -> bool:
    """Nothing listens there (a server's old connections in TIME_WAIT do not count, as for any server)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # creates the store
    return uri


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the server's processes through /proc")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["sigterm", "sigint", "sighup"])
def test_a_stop_signal_to_dbx_ui_stops_the_server_and_its_workers(store, tmp_path, stop):
    """And first, `dbx ui` marks the runs whose process is gone."""
    from mlflow import MlflowClient

    from dbx.liveness import PID_TAG, process_tags

    client = MlflowClient(tracking_uri=store)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    experiment = client.get_experiment_by_name("left-running") or client.get_experiment(
        client.create_experiment("left-running"))
    stale = client.create_run(experiment.experiment_id, tags={**process_tags(), PID_TAG: gone.stdout.strip()})
    port = free_port()
    log = tmp_path / "ui.log"
    ui = subprocess.Popen([sys.executable, "-m", "dbx.cli", "ui", "--tracking-uri", store, "--port", str(port)],
                          stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          start_new_session=True)  # a group of its own, as in a terminal
    try:
        deadline = time.monotonic() + 180
        while True:
            assert ui.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the MLflow server never answered:\n" + log.read_text()
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        server = descendants(ui.pid)
        assert server, "dbx ui started no server process"
        ui.send_signal(stop)
        assert ui.wait(timeout=60) == 0, log.read_text()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in server if alive(pid)], "server processes outlived dbx ui:\n" + log.read_text()
        assert port_is_free(port)
        assert f"stopped ({signal.Signals(stop).name})" in log.read_text()
        assert f"marked run {stale.info.run_name} ({stale.info.run_id}) KILLED" in log.read_text()
        assert client.get_run(stale.info.run_id).info.status == "KILLED"
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()

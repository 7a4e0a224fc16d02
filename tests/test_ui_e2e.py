"""End to end in a real browser: `dbx ui` serves a store holding a small sweep, and headless
Chromium (Debian's `chromium` package; .ci/run installs it) shows the runs and a run's batch_size
chart. The browser is driven over the DevTools protocol with a few lines of standard library
(no playwright, no selenium); the page is polled until it has rendered, since the MLflow UI is a
React app that draws its charts after fetching the data. Every process this test starts runs in
its own process group, and the whole group is stopped at the end."""
import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from dbx.cli import main

pytestmark = pytest.mark.ui

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1400"]

SWEEP = """\
name: ui-sweep
seed: 0
device: cpu
data: {name: synthetic_logistic, params: {n: 200, d: 6, noise: 0.1}}
model: {name: logreg}
optimizer: {lr: 0.2, momentum: 0.9}
epochs: 3
policy: {name: fixed, params: {batch_size: 16}}
tracking: {experiment: ui-e2e, system_metrics: false}
sweep:
  policy:
    - {name: fixed, params: {batch_size: 16}}
    - {name: divebatch, params: {initial: 16, max: 160, delta: 1.0, resize_every: 1}}
"""


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.fail("headless Chromium is needed for the UI test and is not installed. Install Debian's "
                    "package: `apt-get update && apt-get install -y chromium` (.ci/run does this), "
                    "or deselect the test with -m 'not ui'.")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_group(argv, log: Path, **kwargs) -> subprocess.Popen:
    """A process in a new session (its own process group), output to ``log``."""
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, **kwargs)


def stop_group(process: subprocess.Popen) -> None:
    """Stop the process and everything it started: TERM to the group, then KILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; children may linger in the group
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def wait_until(check, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited ({process.returncode}):\n{log.read_text()[-3000:] if log else ''}")
        try:
            last = check()
            if last:
                return last
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout:.0f} s (last: {str(last)[:500]})")


class DevTools:
    """The smallest client of the Chrome DevTools protocol: one page's websocket, JSON commands."""

    def __init__(self, ws_url: str) -> None:
        rest = ws_url.removeprefix("ws://")
        hostport, path = rest.split("/", 1)
        host, port = hostport.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(4096)
        head, self.buffer = response.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.next_id = 0

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _receive(self) -> dict:
        message = b""
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(length)
            if first & 0x0F in (0x1, 0x0):
                message += payload
                if first & 0x80:
                    return json.loads(message)

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        payload = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        header = bytes([0x81])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        elif len(payload) < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            reply = self._receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))


# In the page: is the chart titled `name` drawn, i.e. does its card hold a plotted line with points?
CHART_DRAWN = """(() => {
  const titles = [...document.querySelectorAll('*')].filter(e => e.children.length === 0 && e.textContent.trim() === %s);
  for (const title of titles) {
    let card = title;
    for (let i = 0; i < 8 && card; i++, card = card.parentElement) {
      const line = card.querySelector('svg .scatterlayer path.js-line, svg .scatterlayer .points path');
      if (line && (line.getAttribute('d') || '').length > 3) return true;
    }
  }
  return false;
})()"""


@pytest.fixture
def store(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(SWEEP)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["run", str(spec), "--tracking-uri", uri], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("ui-e2e")
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([experiment.experiment_id])}
    return uri, experiment.experiment_id, runs


def test_the_mlflow_ui_lists_the_sweep_and_draws_the_batch_size_chart(store, tmp_path):
    browser = chromium()
    uri, experiment_id, runs = store
    assert set(runs) == {"ui-sweep", "fixed-seed0", "divebatch-seed0"}
    port = free_port()
    server_log, browser_log = tmp_path / "ui.log", tmp_path / "chromium.log"
    server = start_group([sys.executable, "-m", "dbx.cli", "ui", "--tracking-uri", uri, "--port", str(port)], server_log)
    chrome = None
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: urllib.request.urlopen(f"{base}/health", timeout=5).status == 200, 180,
                   "the MLflow UI to answer", server, server_log)
        printed = server_log.read_text()
        assert f"MLflow UI for {uri} at http://127.0.0.1:{port}" in printed
        assert f"{base}/#/experiments?workflowType=machine_learning" in printed

        profile = tmp_path / "chromium-profile"
        chrome = start_group([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                              "about:blank"], browser_log)
        active = profile / "DevToolsActivePort"
        wait_until(lambda: active.exists() and len(active.read_text().split()) == 2, 60, "Chromium to start",
                   chrome, browser_log)
        devtools_port = active.read_text().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/list", timeout=10))
        page = DevTools(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        page.call("Page.enable")

        # The address `dbx ui` prints: the experiments, in MLflow's training view.
        text = "document.body ? document.body.innerText : ''"
        page.call("Page.navigate", url=f"{base}/#/experiments?workflowType=machine_learning")
        wait_until(lambda: "ui-e2e" in page.evaluate(text), 120, "the experiments page to list ui-e2e")

        # The runs page of the experiment, in MLflow's training view, flat (sorted by name, so the
        # nested runs are rows of their own rather than folded under the sweep's parent run).
        page.call("Page.navigate", url=f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
                                       "&orderByKey=attributes.run_name&orderByAsc=true")
        try:
            wait_until(lambda: all(name in page.evaluate(text) for name in runs), 120, "the runs page to list every run")
        finally:
            page.screenshot(tmp_path / "runs.png")

        # One run's metric charts: the batch_size chart has a drawn line.
        page.call("Page.navigate", url=f"{base}/#/experiments/{experiment_id}/runs/{runs['divebatch-seed0']}"
                                       "/model-metrics?workflowType=machine_learning")
        try:
            wait_until(lambda: page.evaluate(CHART_DRAWN % json.dumps("batch_size")), 120,
                       "the batch_size chart to be drawn")
            body = page.evaluate(text)
        finally:
            page.screenshot(tmp_path / "metrics.png")
        assert "divebatch-seed0" in body and "diversity" in body
    finally:
        if chrome is not None:
            stop_group(chrome)
        stop_group(server)
    for process in (server, chrome):  # nothing of either group is left (once the dead are reaped)
        wait_until(lambda pid=process.pid: not group_alive(pid), 15, f"process group {process.pid} to end")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True

"""``dbx ui``: the MLflow server as a child process group that never outlives ``dbx ui``.

``mlflow ui`` starts a server process that starts its own worker; stopping only the first leaves
the worker holding the port. So the server runs in a process group of its own, and SIGTERM,
SIGINT (Ctrl-C) or SIGHUP (the terminal closed) to ``dbx ui`` stops the whole group: SIGTERM
first, SIGKILL for what is still there after a few seconds. On Linux the server is also asked to
receive SIGTERM if ``dbx ui`` itself dies without a chance to clean up (SIGKILL).
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from typing import Any, Callable

from dbx.errors import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_S = 5.0


def check_port(host: str, port: int) -> None:
    """The port must be free now, or the server would fail after dbx printed its address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # as the server will: connections of a server stopped a moment ago (TIME_WAIT) do not count
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use (another dbx ui or mlflow ui?). Stop that "
                                f"one, or choose another port with --port.") from None
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}. Choose another --port.") from None


def _die_with_parent() -> None:
    """In the child before exec: a new process group, and SIGTERM when the parent dies (Linux)."""
    os.setpgid(0, 0)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(argv: list[str], env: dict[str, str], *, say: Callable[[str], None]) -> int:
    """Run the server until it exits or a stop signal comes; then stop its whole process group.

    Returns 0 when a signal stopped it, 1 when the server exited on its own with an error."""
    stopped: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        stopped.append(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        process = subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509 - single-threaded here
        try:
            while process.poll() is None and not stopped:
                time.sleep(0.1)
        finally:
            stop_group(process)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        say(f"stopped ({signal.Signals(stopped[0]).name}); the MLflow server and its workers are gone")
        return 0
    if process.returncode:
        say(f"the MLflow server exited with code {process.returncode}")
        return 1
    return 0


def stop_group(process: subprocess.Popen[Any], grace: float = GRACE_S) -> None:
    """SIGTERM to the server's process group, SIGKILL to what remains after ``grace`` seconds."""
    group = process.pid
    if not _signal_group(group, signal.SIGTERM):
        process.wait()
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        process.poll()
        if not _group_alive(group):
            break
        time.sleep(0.05)
    else:
        _signal_group(group, signal.SIGKILL)
    process.wait()


def _signal_group(group: int, sig: int) -> bool:
    try:
        os.killpg(group, sig)
        return True
    except ProcessLookupError:
        return False


def _group_alive(group: int) -> bool:
    """Is any process (other than an unreaped zombie) left in the group?"""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return not os.path.isdir("/proc")

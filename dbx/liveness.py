"""Is the process behind a RUNNING run still there? No run may stay RUNNING after its process is gone.

A run that is SIGKILLed (by the out-of-memory killer, a scheduler, ``kill -9``) or whose machine
reboots cannot close itself. Each run therefore records who runs it, in tags:

    dbx.pid, dbx.host, dbx.boot_id, dbx.pid_namespace, dbx.process_start

and a run is *stale* when it is RUNNING, was started on this machine (same host name, same pid
namespace), and its process is gone: the machine booted since, or no process has that pid, or the
process with that pid started at another time (the pid was reused). A run from another machine
cannot be judged from here and is left alone. ``dbx runs --stale``, ``dbx run`` and ``dbx ui``
mark stale runs KILLED, with the reason in their tags, and ``dbx resume`` continues them.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

PID_TAG = "dbx.pid"
HOST_TAG = "dbx.host"
BOOT_TAG = "dbx.boot_id"
NAMESPACE_TAG = "dbx.pid_namespace"
START_TAG = "dbx.process_start"

ALIVE, GONE, ELSEWHERE, UNKNOWN = "alive", "gone", "elsewhere", "unknown"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id") or ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), None if there is none."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # the command name (field 2) may hold spaces and parentheses: count fields after its last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def process_tags() -> dict[str, str]:
    """The tags that identify this process, for the run it is about to drive."""
    pid = os.getpid()
    return {PID_TAG: str(pid), HOST_TAG: platform.node(), BOOT_TAG: _boot_id(), NAMESPACE_TAG: _pid_namespace(),
            START_TAG: _start_time(pid) or ""}


def process_state(tags: dict[str, str]) -> str:
    """``alive``, ``gone``, ``elsewhere`` (another machine or container: cannot tell) or
    ``unknown`` (the run did not record its process)."""
    if PID_TAG not in tags or not tags[PID_TAG].isdigit():
        return UNKNOWN
    if tags.get(HOST_TAG) != platform.node() or tags.get(NAMESPACE_TAG, "") != _pid_namespace():
        return ELSEWHERE
    if tags.get(BOOT_TAG) and tags[BOOT_TAG] != _boot_id():
        return GONE  # this machine rebooted since the run started
    pid = int(tags[PID_TAG])
    started = _start_time(pid)
    if started is not None:
        return ALIVE if started == tags.get(START_TAG, started) else GONE
    if Path("/proc/self/stat").exists():
        return GONE  # /proc works here and has no such process
    try:  # no /proc (macOS): all that can be asked is whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return GONE
    except PermissionError:
        return ALIVE
    return ALIVE


def describe(tags: dict[str, str]) -> str:
    """``pid 4242 on host gpu3``, for messages."""
    return f"pid {tags.get(PID_TAG, '?')} on host {tags.get(HOST_TAG) or tags.get('host', '?')}"


def gone_message(process: str) -> str:
    return (f"its process ({process}) ended without closing the run: it was killed (SIGKILL, out of "
            f"memory, a reboot) or crashed")

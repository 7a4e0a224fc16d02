"""Stop signals: SIGTERM, SIGINT (Ctrl-C) and SIGHUP end a run the way Ctrl-C does.

A scheduler's pre-emption (SIGTERM), Ctrl-C and a closed terminal (SIGHUP) all raise
``KeyboardInterrupt`` in the main thread, so the run is marked KILLED with its checkpoints kept
and ``dbx resume`` continues it, instead of the process vanishing with the run left RUNNING.

Two races are closed here:

- Python runs a signal handler at whatever bytecode is executing, and an exception raised in a
  finalizer (``__del__``, a weakref callback: SQLAlchemy returns connections to its pool in such
  callbacks) is printed as "Exception ignored" and lost. A SIGTERM that lands there used to be
  swallowed: the run went on to finish. So each signal is also recorded, and the runner calls
  ``raise_if_stopped()`` at every epoch's end and before closing a finished run.
- A second signal while the run is being closed would cut the closing short (and leave the run
  RUNNING). While ``closing()`` is active, signals are recorded, and not raised.

A signal the process was started ignoring (``nohup``, a shell's background job) stays ignored.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []  # every stop signal since signals_stop_like_ctrl_c() began
_handled = [0]  # how many of them a KeyboardInterrupt has been handled for
_closing = [False]


def _stop(signum: int, frame: Any) -> None:
    _received.append(signum)
    if not _closing[0]:
        raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_stop_like_ctrl_c() -> Iterator[None]:
    """Install the handlers for the duration of a command (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in STOP_SIGNALS:
        if sig != signal.SIGTERM and signal.getsignal(sig) is signal.SIG_IGN:
            continue
        previous[sig] = signal.signal(sig, _stop)
    _received.clear()
    _handled[0] = 0
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def raise_if_stopped() -> None:
    """Raise the KeyboardInterrupt of a stop signal that was received but got lost."""
    if len(_received) > _handled[0]:
        handled()
        raise KeyboardInterrupt(f"{signal.Signals(_received[-1]).name} (received earlier)")


def handled() -> None:
    """The runner caught the interruption: the signals so far are dealt with."""
    _handled[0] = len(_received)


@contextlib.contextmanager
def closing() -> Iterator[None]:
    """Signals during this block are recorded, not raised: closing the run must not be cut short."""
    before, _closing[0] = _closing[0], True
    try:
        yield
    finally:
        _closing[0] = before

"""Named points where a run can be held, so that tests kill a real process at an exact moment.

    DBX_HOLD_AT=checkpoint:1 DBX_HOLD_FILE=/tmp/held dbx run spec.yaml

stops the run just after epoch 1's checkpoint is written (before that epoch's metrics reach the
store): the process writes its pid to ``$DBX_HOLD_FILE`` and sleeps until a signal ends it. A test
then sends SIGKILL or SIGTERM to a process whose state it knows, instead of guessing with timers
on a loaded machine. The points:

- ``run-open``: the MLflow run exists and the ``tracking:`` line is printed; no epoch has run;
- ``checkpoint:N``: epoch N's checkpoint is on disk, its metrics are not yet logged;
- ``before-close``: every epoch is trained and checkpointed, the run is not yet closed.

Unset (always, outside tests), ``hold`` is one dictionary lookup.
"""
from __future__ import annotations

import os
import time

HOLD_ENV = "DBX_HOLD_AT"
FILE_ENV = "DBX_HOLD_FILE"


def hold(point: str) -> None:
    """Sleep here forever (until a signal) when ``$DBX_HOLD_AT`` names this point."""
    if os.environ.get(HOLD_ENV) != point:
        return
    marker = os.environ.get(FILE_ENV)
    if marker:
        with open(marker, "w") as handle:
            handle.write(str(os.getpid()))
    while True:
        time.sleep(0.05)  # Python runs signal handlers between sleeps

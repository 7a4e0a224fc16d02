"""How long a `dbx run` takes to exit after SIGTERM, with and without skipping Python's final
garbage collections (``dbx.cli._skip_the_final_garbage_collections``), side by side.

Each trial starts a real `dbx run` held just after epoch 1's checkpoint (``DBX_HOLD_AT``, see
dbx/faults.py), sends SIGTERM, and times until the process has exited: closing the run KILLED,
then the interpreter's own exit. The two sides alternate, so a noisy machine weighs on both.

    python benchmarks/stop_latency.py              # 5 trials a side
    python benchmarks/stop_latency.py --trials 10
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = """\
name: stop-latency
device: cpu
data: {name: synthetic_logistic, params: {n: 2000, d: 16}}
model: {name: mlp, params: {widths: [64]}}
optimizer: {lr: 0.05}
epochs: 3
policy: {name: divebatch, params: {initial: 16, max: 256, resize_every: 1}}
tracking: {system_metrics: false}
"""
ENTRY = {
    "dbx": "import dbx.cli as c; c.main()",
    "without the skip": "import atexit, dbx.cli as c; atexit.unregister(c._skip_the_final_garbage_collections); c.main()",
}


def one_trial(folder: Path, code: str) -> tuple[float, float]:
    """Seconds from SIGTERM to the run's KILLED line, and to the process's exit."""
    held = folder / "held"
    held.unlink(missing_ok=True)
    env = {**os.environ, "DBX_HOLD_AT": "checkpoint:1", "DBX_HOLD_FILE": str(held), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-c", code, "run", str(folder / "spec.yaml"), "--tracking-uri",
                                f"sqlite:///{folder / 'mlflow.db'}"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    while not held.exists():
        if process.poll() is not None:
            raise SystemExit(process.stdout.read())
        time.sleep(0.02)
    start = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    closed = None
    for line in process.stdout:
        if "marked KILLED" in line:
            closed = time.perf_counter() - start
    process.wait()
    if process.returncode != 130 or closed is None:
        raise SystemExit(f"unexpected exit {process.returncode}")
    return closed, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[tuple[float, float]]] = {side: [] for side in ENTRY}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "spec.yaml").write_text(SPEC)
        for trial in range(args.trials):
            for side, code in (ENTRY.items() if trial % 2 == 0 else reversed(ENTRY.items())):
                times[side].append(one_trial(folder, code))
                print(f"trial {trial + 1} {side:>16}: closed after {times[side][-1][0]:.2f} s, "
                      f"exited after {times[side][-1][1]:.2f} s", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    medians = {side: (statistics.median(c for c, _ in t), statistics.median(e for _, e in t)) for side, t in times.items()}
    for side, (closed, exited) in medians.items():
        print(f"{side:>16}: median {closed:.2f} s to close the run, {exited:.2f} s to exit")
    print(f"exit time, without the skip / dbx: {medians['without the skip'][1] / medians['dbx'][1]:.2f}x")


if __name__ == "__main__":
    main()

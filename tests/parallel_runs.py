"""`python parallel_runs.py N URI SPEC`: start N `dbx run SPEC --tracking-uri URI` processes at
the same moment; exit 0 when all N exit 0, else print each one's output and exit 1.

Each run is a real process (os.fork of one that has imported torch and MLflow and built the
spec's parts once, with one thread each): started from scratch, eight processes would spend a
minute of a 2-core machine importing torch, and start seconds apart instead of together. The
store itself is untouched until the children start, so its creation is raced as a user's
parallel `dbx run`s race it.
"""
import os
import sys
import tempfile

import matplotlib
import mlflow  # noqa: F401 - imported before the fork, as the children need it
import torch

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401 - each run draws its curves at the end

from dbx.checks import check_spec_file
from dbx.cli import main
from dbx.train.parts import build_parts


def main_(count: int, uri: str, spec: str) -> int:
    torch.set_num_threads(1)  # N processes on few cores: intra-op threads would only contend
    build_parts(check_spec_file(spec), torch.device("cpu"))  # imports every plugin module once
    logs, children = [], []
    for _ in range(count):
        log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        logs.append(log.name)
        pid = os.fork()
        if pid == 0:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                main(["run", spec, "--tracking-uri", uri])
            except SystemExit as exc:
                os._exit(exc.code if isinstance(exc.code, int) else 1)
            os._exit(0)
        children.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    for index, (code, name) in enumerate(zip(codes, logs, strict=True)):
        if code != 0:
            print(f"--- run {index} exited {code}:\n{open(name).read()}")
        os.unlink(name)
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    sys.exit(main_(int(sys.argv[1]), sys.argv[2], sys.argv[3]))

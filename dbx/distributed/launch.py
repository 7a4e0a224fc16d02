"""``dbx run --nproc N`` and ``dbx resume --nproc N``: the same command under torchrun's own
launcher (``python -m torch.distributed.run``), on this node. Several nodes: run torchrun itself
on each, with its ``--nnodes``/``--rdzv-*`` options and ``-m dbx run spec.yaml``."""
from __future__ import annotations

import subprocess
import sys
from typing import Sequence


def torchrun_command(nproc: int, dbx_args: Sequence[str]) -> list[str]:
    """The torchrun command line that starts ``nproc`` processes of ``dbx <dbx_args>`` here."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "dbx", *dbx_args]


def launch(nproc: int, dbx_args: Sequence[str]) -> int:
    """Run ``dbx <dbx_args>`` on ``nproc`` local processes; torchrun's exit code (0 when every
    rank finished, 1 when one failed: torchrun then stops the others and names the rank)."""
    completed = subprocess.run(torchrun_command(nproc, dbx_args), check=False)
    return 0 if completed.returncode == 0 else (130 if completed.returncode in (130, -2) else 1)

"""``dbx run SPEC``: check the spec, then train its one run or each point of its sweep.

This is the only module that knows both ways a spec can run; ``dbx.sweep`` builds on
``dbx.runner`` (a sweep point is one run), and neither imports this one.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from dbx.checks import check_spec_file

Say = Callable[[str], None]


def run_spec(path: str, overrides: Sequence[str] = (), *, tracking_uri: str | None = None,
             experiment: str | None = None, say: Say = print, dry_run: bool = False) -> int:
    """Run the spec at ``path`` (each point of its sweep, if it has one); return the exit code."""
    spec = check_spec_file(path, overrides, warn=say)
    from dbx import sweep

    if dry_run:
        return sweep.describe_points(spec, say)
    from dbx import distributed, tracking
    from dbx.errors import UserError
    from dbx.store import check_store

    uri = tracking.resolve_tracking_uri(tracking_uri, spec.tracking.uri)
    if distributed.setup():  # under torchrun: rank 0 alone looks at the store
        if spec.sweep:
            raise UserError("a spec with a sweep cannot run under torchrun (--nproc): start one distributed "
                            "run per point (dbx run --dry-run lists them; --set fixes a point)")
        if distributed.rank() != 0:
            from dbx.runner import run_one

            return run_one(spec, uri=uri, experiment=experiment, say=say).exit_code
    check_store(uri)
    _check_checkpoint_folders(spec, uri)
    tracking.mark_stale(uri, say=say)  # runs left RUNNING by a process that is gone
    if spec.sweep:
        return sweep.run_sweep(spec, uri=uri, experiment=experiment, say=say)
    from dbx.runner import run_one

    return run_one(spec, uri=uri, experiment=experiment, say=say).exit_code


def _check_checkpoint_folders(spec: Any, uri: str) -> None:
    """Every checkpoint folder the spec's runs would write to can be written: checked before a
    sweep's parent run (or the one run) exists."""
    from dbx import tracking
    from dbx.spec import expand_sweep
    from dbx.train.checkpoint import check_folder

    bases = {tracking.checkpoint_base(uri, point.checkpoint.dir) for _, point in expand_sweep(spec)
             if point.checkpoint.enabled}
    for base in sorted(bases):
        check_folder(base)

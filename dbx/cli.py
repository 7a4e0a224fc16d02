"""The ``dbx`` command line. Commands only parse, delegate and turn errors into exit codes.

Exit codes: 0 success; 1 the run started and failed (the MLflow run is marked FAILED with the
reason); 2 the input is wrong (spec, option, plugin, data), and nothing was started.

torch and mlflow are imported inside the commands that need them, so ``dbx --help`` is instant.
"""
from __future__ import annotations

import sys
import traceback
from typing import Any, Callable, NoReturn

import click

from dbx.errors import RunFailed, UserError

EXAMPLE_SPEC = "experiments/quickstart.yaml"


def _fail(exc: BaseException, debug: bool) -> NoReturn:
    if debug:
        traceback.print_exception(exc)
    code = getattr(exc, "exit_code", 1)
    label = "error" if code == 2 else "run failed"
    click.echo(f"{label}: {exc}", err=True)
    if not debug and code != 2:
        click.echo("(run again with --debug for the traceback)", err=True)
    sys.exit(code)


def _guarded(debug: bool, action: Callable[[], Any]) -> Any:
    try:
        return action()
    except (UserError, RunFailed) as exc:
        _fail(exc, debug)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dbx", prog_name="dbx")
def main() -> None:
    """dbx trains PyTorch models with a batch size that adapts during training (DiveBatch,
    AdaBatch, fixed SGD, or your own policy) and records every run in MLflow.

    \b
    Start here:
      dbx run experiments/quickstart.yaml        # about a minute on a laptop CPU
      mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db
    \b
    Check a spec without running it:   dbx validate my_spec.yaml
    See what can be named in a spec:   dbx plugins
    """


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a spec value by its dotted key path, e.g. --set policy.params.delta=0.05 "
                   "--set epochs=5. Values are read as YAML (5e-4 is a number, [1,2] a list). Repeatable.")
@click.option("--device", type=str, default=None, metavar="auto|cpu|cuda[:N]",
              help="Where to train; overrides the spec's device. auto (the default) uses CUDA when there is one.")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="MLflow store: sqlite:///path.db, a folder, or http://server. Default: the spec's "
                   "tracking.uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db.")
@click.option("--experiment", default=None, help="MLflow experiment name. Default: tracking.experiment, else the spec's name.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def run(spec_path: str, overrides: tuple[str, ...], device: str | None, tracking_uri: str | None,
        experiment: str | None, debug: bool) -> None:
    """Train the experiment described by SPEC (a YAML file) and log it to MLflow.

    \b
    Examples:
      dbx run experiments/quickstart.yaml
      dbx run experiments/quickstart.yaml --set policy.params.delta=0.05 --set epochs=10
      dbx run spec.yaml --device cuda:1 --tracking-uri http://127.0.0.1:5000

    The spec is checked completely (keys, types, plugin names and their parameters) before
    anything starts; then the run prints one line per epoch and the MLflow command to browse it.
    Exit code 0 when the run finished, 1 when it failed, 2 when the input is wrong.
    """
    from dbx.runner import run_spec

    extra = [f"device={device}"] if device else []
    code = _guarded(debug, lambda: run_spec(spec_path, [*overrides, *extra], tracking_uri=tracking_uri,
                                            experiment=experiment, say=click.echo))
    sys.exit(code or 0)


@main.command()
@click.argument("spec_paths", metavar="SPEC...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Apply overrides before checking, as in `dbx run`.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def validate(spec_paths: tuple[str, ...], overrides: tuple[str, ...], debug: bool) -> None:
    """Check specs without running them: every problem, with file:line, at once.

    \b
    Examples:
      dbx validate experiments/quickstart.yaml
      dbx validate experiments/*/*.yaml

    Checks the YAML, the keys and types, and that each named plugin exists and accepts the
    given params. Exit code 0 when all are valid, 2 otherwise. Starts no run.
    """
    from dbx.checks import check_spec_file

    failed = 0
    for path in spec_paths:
        try:
            check_spec_file(path, overrides)
            click.echo(f"ok  {path}")
        except UserError as exc:
            failed += 1
            if debug:
                traceback.print_exception(exc)
            click.echo(f"{exc}", err=True)
    if failed:
        click.echo(f"{failed} of {len(spec_paths)} spec(s) have problems", err=True)
        sys.exit(2)


@main.command()
@click.option("--check", is_flag=True, help="Also import every plugin and report each one that fails.")
def plugins(check: bool) -> None:
    """List every registered plugin per group, with the package and version that provides it.

    Plugins are entry points in the groups dbx.policies, dbx.estimators, dbx.models and
    dbx.datasets; a pip-installed package that declares one is found with no change to dbx.
    The NAME column is what a spec uses, e.g. policy: {name: divebatch}.
    """
    from dbx.checks import plugin_table

    exit_code = plugin_table(check=check, echo=click.echo)
    sys.exit(exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()

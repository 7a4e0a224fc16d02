"""The ``dbx`` command line. Commands only parse, delegate and turn errors into exit codes.

Exit codes: 0 success; 1 the run started and failed (the MLflow run is marked FAILED with the
reason); 2 the input is wrong (spec, option, plugin, data), and nothing was started.

torch and mlflow are imported inside the commands that need them, so ``dbx --help`` is instant.
"""
from __future__ import annotations

import atexit
import sys
import traceback
from typing import Any, Callable, NoReturn

import click

from dbx.errors import RunFailed, UserError
from dbx.stopping import signals_stop_like_ctrl_c

EXAMPLE_SPEC = "experiments/quickstart.yaml"


def _skip_the_final_garbage_collections() -> None:
    """At exit, Python's collector walks every object torch and MLflow created: 4-10 s on a
    loaded 2-core machine (a SIGTERM'd run took 5 s to exit, a tiny ``dbx run`` spent more time
    exiting than training). By now the run is closed and its files written, so the objects are
    frozen instead (``python -c "import torch"`` exits in 1.8 s instead of 5.6 s there)."""
    import gc

    gc.freeze()


atexit.register(_skip_the_final_garbage_collections)  # registered first, so it runs last


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
    from dbx.tracking import quiet_mlflow

    quiet_mlflow(debug)
    try:
        return action()
    except (UserError, RunFailed) as exc:
        _fail(exc, debug)
    except KeyboardInterrupt:  # before a run existed (a run's own interruption returns 130 itself)
        if debug:
            traceback.print_exc()
        click.echo("interrupted before training started", err=True)
        sys.exit(130)


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
              help="MLflow store: sqlite:///path.db (or just path.db) or http://server. Default: the spec's "
                   "tracking.uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db.")
@click.option("--experiment", default=None, help="MLflow experiment name. Default: tracking.experiment, else the spec's name.")
@click.option("--dry-run", is_flag=True, help="List the runs the spec (and its sweep) would start, and start none.")
@click.option("--nproc", type=click.IntRange(1, 1024), default=None, metavar="N",
              help="Train on N processes of this machine with PyTorch DDP, through torchrun's own launcher "
                   "(one GPU per process on CUDA, gloo on the CPU). Same as torchrun --standalone "
                   "--nproc-per-node N -m dbx run SPEC ...; for several machines run torchrun itself.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def run(spec_path: str, overrides: tuple[str, ...], device: str | None, tracking_uri: str | None,
        experiment: str | None, dry_run: bool, nproc: int | None, debug: bool) -> None:
    """Train the experiment described by SPEC (a YAML file) and log it to MLflow.

    \b
    Examples:
      dbx run experiments/quickstart.yaml
      dbx run experiments/quickstart.yaml --set policy.params.delta=0.05 --set epochs=10
      dbx run spec.yaml --device cuda:1 --tracking-uri http://127.0.0.1:5000

    The spec is checked completely (keys, types, plugin names and their parameters) before
    anything starts; then the run prints one line per epoch and the MLflow command to browse it.
    Exit code 0 when the run finished, 1 when it failed, 2 when the input is wrong, 130 when
    Ctrl-C or SIGTERM stopped it (the run is marked KILLED; `dbx resume RUN_ID` continues it).
    """
    if nproc is not None and not dry_run:
        _launch_distributed(nproc, ["run", spec_path, *_repeat("--set", overrides), *_option("--device", device),
                                    *_option("--tracking-uri", tracking_uri), *_option("--experiment", experiment),
                                    *(["--debug"] if debug else [])], debug, spec_path, overrides)
    from dbx.launch import run_spec

    extra = [f"device={device}"] if device else []
    with signals_stop_like_ctrl_c():
        code = _guarded(debug, lambda: run_spec(spec_path, [*overrides, *extra], tracking_uri=tracking_uri,
                                                experiment=experiment, say=click.echo,
                                                dry_run=dry_run))
    sys.exit(code or 0)


def _option(name: str, value: str | None) -> list[str]:
    return [name, value] if value is not None else []


def _repeat(name: str, values: tuple[str, ...]) -> list[str]:
    return [item for value in values for item in (name, value)]


def _launch_distributed(nproc: int, args: list[str], debug: bool, spec_path: str | None = None,
                        overrides: tuple[str, ...] = ()) -> NoReturn:
    """Check the spec here (a wrong one exits 2 before any process starts), then hand the same
    command to torchrun's launcher on ``nproc`` processes and exit with its status."""
    from dbx.distributed.launch import launch

    if spec_path is not None:
        from dbx.checks import check_spec_file

        _guarded(debug, lambda: check_spec_file(spec_path, overrides, warn=lambda _line: None))
    sys.exit(launch(nproc, args))


@main.command()
@click.argument("run_id")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="The MLflow store the run is in. Default: $MLFLOW_TRACKING_URI, else ./mlflow.db.")
@click.option("--device", type=str, default=None, metavar="auto|cpu|cuda[:N]", help="Override the run's device.")
@click.option("--force", is_flag=True, help="Resume a run that is RUNNING on another machine (whose process "
              "dbx cannot check from here) because that machine is gone.")
@click.option("--nproc", type=click.IntRange(1, 1024), default=None, metavar="N",
              help="Continue on N local processes with PyTorch DDP (torchrun's launcher), whatever number the "
                   "run had before: the same global batches give the same result.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def resume(run_id: str, tracking_uri: str | None, device: str | None, force: bool, nproc: int | None,
           debug: bool) -> None:
    """Continue a killed, failed or interrupted run from its newest intact checkpoint.

    \b
    Example:
      dbx resume 3f9c1a2b4d5e4f60a7b8c9d0e1f2a3b4

    The run continues in the same MLflow run, at the epoch after its last checkpoint, with the
    same data order and random numbers, so it ends as an uninterrupted run would. A damaged
    checkpoint is skipped (with a warning) in favour of the one before it. A run killed before
    its first checkpoint is trained again from the beginning (its start is fully determined by
    the spec it logged); a run killed after its last epoch is closed, with what the store lacked.
    A run whose process is still alive is refused.
    """
    if nproc is not None:
        _launch_distributed(nproc, ["resume", run_id, *_option("--tracking-uri", tracking_uri),
                                    *_option("--device", device), *(["--force"] if force else []),
                                    *(["--debug"] if debug else [])], debug)
    from dbx.runner import resume_run

    with signals_stop_like_ctrl_c():
        code = _guarded(debug, lambda: resume_run(run_id, tracking_uri=tracking_uri, device=device, force=force,
                                                  say=click.echo))
    sys.exit(code or 0)


@main.command()
@click.option("--tracking-uri", default=None, metavar="URI",
              help="MLflow store, as in `dbx run`. Default: $MLFLOW_TRACKING_URI, else ./mlflow.db.")
@click.option("--experiment", default=None, metavar="NAME", help="Only the runs of this experiment.")
@click.option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True, help="How many runs, newest first.")
@click.option("--stale", is_flag=True, help="Find the RUNNING runs whose process is gone (killed, crashed, "
              "rebooted) and mark them KILLED, so that dbx resume can continue them.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def runs(tracking_uri: str | None, experiment: str | None, limit: int, stale: bool, debug: bool) -> None:
    """List the newest runs in the store, and whether the process of each RUNNING one is alive.

    \b
    Examples:
      dbx runs                    # the 20 newest runs in ./mlflow.db
      dbx runs --stale            # mark the runs whose process is gone KILLED

    Each run records the pid, host and start time of the process that drives it, so a run left
    RUNNING by a SIGKILL or a crash is recognised. Runs started on another machine are shown as
    such and left alone. `dbx run` and `dbx ui` mark stale runs of their store too.
    """
    from dbx import tracking

    def action() -> int:
        uri = tracking.resolve_tracking_uri(tracking_uri)
        if stale:
            from dbx.store import check_store

            check_store(uri)
            marked = tracking.mark_stale(uri, say=click.echo)
            click.echo(f"{len(marked)} stale run(s) marked KILLED" if marked else "no stale runs")
            return 0
        for line in tracking.describe_runs(uri, experiment=experiment, limit=limit):
            click.echo(line)
        return 0

    sys.exit(_guarded(debug, action) or 0)


@main.command()
@click.argument("spec_paths", metavar="SPEC...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Apply overrides before checking, as in `dbx run`.")
@click.option("--strict", is_flag=True, help="Count warnings (plugins whose params dbx cannot check) as problems.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def validate(spec_paths: tuple[str, ...], overrides: tuple[str, ...], strict: bool, debug: bool) -> None:
    """Check specs without running them: every problem, with file:line, at once.

    \b
    Examples:
      dbx validate experiments/quickstart.yaml
      dbx validate experiments/*/*.yaml
      dbx validate --strict my_plugin/example.yaml   # a plugin author's CI

    Checks the YAML, the keys and types, and that each named plugin exists and accepts the
    given params. A plugin whose signature dbx cannot check params against (an untyped or
    positional parameter) gets a warning: its params reach it unchecked. Exit code 0 when all
    are valid, 2 otherwise (also for warnings, with --strict). Starts no run.
    """
    from dbx.checks import check_spec_file

    failed = 0
    for path in spec_paths:
        warnings: list[str] = []
        try:
            check_spec_file(path, overrides, warn=warnings.append)
        except UserError as exc:
            failed += 1
            if debug:
                traceback.print_exception(exc)
            click.echo(f"{exc}", err=True)
            continue
        for warning in warnings:
            click.echo(warning, err=True)
        if strict and warnings:
            failed += 1
        else:
            click.echo(f"ok  {path}" + (f" ({len(warnings)} warning(s))" if warnings else ""))
    if failed:
        click.echo(f"{failed} of {len(spec_paths)} spec(s) have problems", err=True)
        sys.exit(2)


@main.command("spec")
@click.option("--markdown", is_flag=True, help="The reference as Markdown (what docs/spec.md holds), not a YAML spec.")
@click.option("--output", "-o", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="Write to FILE instead of printing.")
def spec_command(markdown: bool, output: str | None) -> None:
    """Every key a spec may hold, from the schema itself: as a YAML spec with every default
    filled in and each key described (a starting point), or with --markdown as the reference.

    \b
    Examples:
      dbx spec > my_spec.yaml                          # then fill in the required keys
      dbx spec --markdown --output docs/spec.md        # regenerate the reference
    """
    from dbx.spec_reference import markdown_reference, yaml_template

    text = markdown_reference() if markdown else yaml_template()
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        click.echo(f"error: cannot write {output}: {exc.strerror or exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {output}")


@main.group(invoke_without_command=True)
@click.option("--check", is_flag=True, help="Also import every plugin and report each one that fails.")
@click.pass_context
def plugins(ctx: click.Context, check: bool) -> None:
    """List every registered plugin per group, with the package and version that provides it.

    Plugins are entry points in the groups dbx.policies, dbx.estimators, dbx.models and
    dbx.datasets; a pip-installed package that declares one is found with no change to dbx.
    The NAME column is what a spec uses, e.g. policy: {name: divebatch}.

    \b
    Write your own:  dbx plugins new policy|estimator|model|dataset NAME   (then see docs/plugins.md)
    """
    if ctx.invoked_subcommand is not None:
        return
    from dbx.checks import plugin_table

    exit_code = plugin_table(check=check, echo=click.echo)
    sys.exit(exit_code)


@plugins.group()
def new() -> None:
    """Start a plugin package of your own, from a template."""


def _new_command(kind: str) -> None:
    """``dbx plugins new KIND NAME`` for one kind (the four differ only in words)."""
    from dbx.scaffold import KINDS

    title, section, _ = KINDS[kind]

    @new.command(kind, help=f"""Write a {title} package NAME: setup.cfg with the entry point, a documented
    {kind} module to edit, tests that run dbx's contract checks, an example spec and a README.

    \b
    Example:
      dbx plugins new {kind} my{kind}
      pip install -e dbx-my{kind} && pytest dbx-my{kind} && dbx run dbx-my{kind}/example.yaml
    """)
    @click.argument("name")
    @click.option("--dir", "directory", default=".", show_default=True, type=click.Path(file_okay=False),
                  help="Folder in which to create the package folder dbx-NAME.")
    @click.option("--debug", is_flag=True, help="Show full tracebacks.")
    def command(name: str, directory: str, debug: bool) -> None:
        from dbx.scaffold import new_package

        folder = _guarded(debug, lambda: new_package(kind, name, directory))
        click.echo(f"created {folder}")
        click.echo("next:")
        click.echo(f"  pip install -e {folder}        # registers {kind} {name!r} with dbx ({section}: {{name: {name}}})")
        click.echo(f"  pytest {folder}                # the contract checks and your {kind}'s tests")
        click.echo(f"  dbx run {folder}/example.yaml  # a one-minute run, logged to MLflow")


for _kind in ("policy", "estimator", "model", "dataset"):
    _new_command(_kind)


@main.command()
@click.option("--experiment", default=None, metavar="NAME", help="Compare every run of this MLflow experiment.")
@click.option("--parent", default=None, metavar="RUN_ID", help="Compare the runs of this sweep (its parent run id). "
              "Default, when neither is given: the latest sweep in the store.")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="MLflow store, as in `dbx run`. Default: $MLFLOW_TRACKING_URI, else ./mlflow.db.")
@click.option("--group-by", default="name", show_default=True, metavar="KEY[,KEY]",
              help="What makes a group: 'name' (the run name without -seedN, e.g. divebatch), a param "
                   "(policy.name), tags.KEY, or several joined by commas.")
@click.option("--baseline", default=None, metavar="GROUP", help="The group speedups are measured against. "
              "Default: the first group (the first value of the sweep).")
@click.option("--metric", default="auto", show_default=True,
              type=click.Choice(["auto", "test_accuracy", "test_perplexity", "test_loss"]),
              help="What the runs are compared by; auto: test_perplexity when every run logged it (language "
                   "models), else test_accuracy. Perplexity and loss: lower is better.")
@click.option("--target", type=float, default=None, metavar="VALUE",
              help="Common target of the metric: an accuracy as a fraction (0.9), or a perplexity (8.5). Default: "
                   "the baseline's final accuracy minus 1 point (final perplexity plus 1%).")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True)
@click.option("--plot", "plot_path", default=None, metavar="OUT.png",
              help="Also draw accuracy (against epochs and seconds), batch size and lr, one line per group.")
@click.option("--log", "log_to_parent", is_flag=True,
              help="Attach the table and the plots to the sweep's parent run (they show in the MLflow UI).")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def compare(experiment: str | None, parent: str | None, tracking_uri: str | None, group_by: str,
            baseline: str | None, metric: str, target: float | None, fmt: str, plot_path: str | None,
            log_to_parent: bool, debug: bool) -> None:
    """Compare groups of runs (policies, over seeds): did one reach good accuracy sooner?

    \b
    Examples:
      dbx compare                                     # the latest sweep in ./mlflow.db
      dbx compare --experiment synthetic --format markdown --plot curves.png
      dbx compare --parent 3f2a... --group-by policy.name --baseline fixed --target 0.93
      dbx compare --experiment lm-cpu --metric test_perplexity --target 6.0   # language models

    Per group, mean and standard error over seeds: final and best test accuracy; epochs and
    training seconds to the group's own final accuracy minus 1 point, on the seed-averaged curve
    (the DiveBatch paper's metric); epochs and seconds to a common target accuracy (the fairer
    one), also with evaluation time; speedups against the baseline. Language models are
    compared by test perplexity (lower is better; "1%" is then 1% above the final value).
    Exit code 2 when there is nothing to compare.
    """
    from dbx import report, tracking

    def action() -> None:
        if experiment and parent:
            raise UserError("give --experiment or --parent, not both")
        if plot_path:
            report.check_plot_path(plot_path)
        uri = tracking.resolve_tracking_uri(tracking_uri)
        comparison = report.load_comparison(uri, experiment=experiment, parent=parent, group_by=group_by,
                                            baseline=baseline, target=target, metric=metric)
        if log_to_parent and len(comparison.parents) != 1:
            raise UserError("--log attaches to a sweep's parent run, but these runs have "
                            f"{len(comparison.parents) or 'no'} parents; compare one sweep with --parent RUN_ID")
        click.echo(report.render(comparison, fmt), nl=False)
        if plot_path:
            report.save_plot(comparison, plot_path)
            click.echo(f"plots: {plot_path}", err=True)
        if log_to_parent:
            report.attach(comparison, uri, comparison.parents[0])
            click.echo(f"attached to run {comparison.parents[0]}: comparison/comparison.md, "
                       "comparison/curves.png", err=True)

    _guarded(debug, action)


@main.command()
@click.option("--tracking-uri", default=None, metavar="URI",
              help="MLflow store, as in `dbx run`. Default: $MLFLOW_TRACKING_URI, else ./mlflow.db.")
@click.option("--port", type=int, default=5000, show_default=True, help="The port on 127.0.0.1 (1-65535); it must be free.")
@click.option("--debug", is_flag=True, help="Show full tracebacks, and MLflow's own INFO lines.")
def ui(tracking_uri: str | None, port: int, debug: bool) -> None:
    """Start the MLflow UI on the store dbx uses, on 127.0.0.1, and print its address.

    \b
    Example:
      dbx ui                      # then open http://127.0.0.1:5000
      dbx ui --tracking-uri sqlite:////data/runs/mlflow.db --port 5001

    The experiments dbx creates open on MLflow's training-runs view; a sweep is a parent run
    with its points nested under it, and `dbx compare --log` puts the comparison on the parent.
    Runs left RUNNING by a process that is gone are marked KILLED first. Stop it with Ctrl-C
    (or SIGTERM, or by closing the terminal): the server and its workers stop with it.
    Exit code 2 when the store is missing or the port is taken.
    """
    from pathlib import Path

    from dbx import tracking
    from dbx import ui as server

    def action() -> int:
        if not 1 <= port <= 65535:
            raise UserError(f"--port {port} is not a port number; choose one from 1 to 65535 (the default is 5000).")
        uri = tracking.resolve_tracking_uri(tracking_uri)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
            raise UserError(f"there is no MLflow store at {uri}. Run `dbx run SPEC` first, or pass the store "
                            f"with --tracking-uri.")
        from dbx.store import check_store

        check_store(uri, writing=False)
        server.check_port("127.0.0.1", port)
        tracking.mark_stale_if_writable(uri, say=click.echo)
        argv, env = tracking.ui_server(uri, port=port)
        click.echo(f"MLflow UI for {uri} at http://127.0.0.1:{port}  (Ctrl-C to stop)")
        click.echo(f"training runs: {tracking.ui_address('127.0.0.1', port)}")
        return server.serve(argv, env, say=click.echo)

    sys.exit(_guarded(debug, action) or 0)


if __name__ == "__main__":  # pragma: no cover
    main()

"""Everything MLflow: where the store is, the run's lifecycle, params, metrics, artifacts, tags.

Metrics are buffered and written with one ``log_batch`` per epoch: on a sqlite store one
``log_metric`` call costs about 9 ms and ``log_batch`` about 0.16 ms per value, so logging never
shows in the training step. The client API is used throughout (no fluent global state), so
several runs can be driven from one process, e.g. a sweep or the tests.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from dbx.errors import UserError
from dbx.liveness import process_tags
from dbx.store import check_store  # noqa: F401 - the store's checks, where callers found them before

DEFAULT_DB = "mlflow.db"  # MLflow's own default store name: a plain `mlflow ui` in the same folder shows it
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # makes the MLflow 3 UI open on the training-runs view
MAX_BATCH = 1000
MAX_PARAMS = 100


_USER_MLFLOW_LEVEL = os.environ.get("MLFLOW_LOGGING_LEVEL")  # as exported, before dbx sets it


def quiet_mlflow(debug: bool = False) -> None:
    """MLflow's INFO lines (database creation and migration, the system-metrics thread) drown the
    epoch lines: they show with ``--debug`` only (or when ``$MLFLOW_LOGGING_LEVEL`` asks for them).

    MLflow sets its loggers' levels when it is imported, from ``$MLFLOW_LOGGING_LEVEL``, so the
    variable is set for an import still to come (and for the ``dbx ui`` server), and the loggers
    themselves for an import that already happened.
    """
    level = "INFO" if debug else (_USER_MLFLOW_LEVEL or "WARNING")
    os.environ["MLFLOW_LOGGING_LEVEL"] = level
    logging.getLogger("mlflow").setLevel(level.upper())
    logging.getLogger("alembic").setLevel("INFO" if debug else "WARNING")
    logging.getLogger("sqlalchemy").setLevel("WARNING")  # every SQL statement at INFO: never wanted
    # a failing store is reported by dbx in a line or two; MLflow would add the SQL and a traceback
    logging.getLogger("mlflow.store.db.utils").setLevel("INFO" if debug else "CRITICAL")


def resolve_tracking_uri(cli_uri: str | None = None, spec_uri: str | None = None) -> str:
    """--tracking-uri, else the spec's tracking.uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db.

    A relative sqlite path is made absolute, so that the printed ``mlflow ui`` command works from
    any folder.
    """
    uri = cli_uri or spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if "://" not in uri and uri.endswith(".db"):  # a plain path to a database file
        uri = f"sqlite:///{uri}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    elif "://" not in uri:  # a plain folder: MLflow's file store
        uri = str(Path(uri).expanduser().resolve())
    return uri


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


def _client(uri: str) -> Any:
    from dbx.store import client

    return client(uri)


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a local store, as an absolute path (MLflow otherwise uses the current folder)."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
    if "://" not in uri:
        return None  # the file store keeps artifacts inside its own folder
    return None  # a server decides


def ensure_experiment(client: Any, uri: str, name: str) -> str:
    """The experiment's id, creating it (tagged for the training-runs view) when new.

    Under the store's lock, so that parallel first runs do not both create it; a server store has
    no such lock, and there the loser of the race finds the winner's experiment.
    """
    from mlflow.exceptions import MlflowException

    from dbx.store import store_lock

    with store_lock(uri):
        try:
            return _get_or_create_experiment(client, uri, name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return _get_or_create_experiment(client, uri, name)


def _get_or_create_experiment(client: Any, uri: str, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment {name!r} is deleted in {uri}; restore it "
                            f"(mlflow experiments restore) or choose another --experiment.")
        return found.experiment_id
    root = _artifact_root(uri)
    location = None
    if root is not None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        location = Path(root, safe).as_uri()
    return client.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND_TAG: "custom_model_development", "dbx": "true"})


def environment_tags(device_label: str, plugins: dict[str, str]) -> dict[str, str]:
    import torch

    import dbx

    tags = {
        "dbx.version": dbx.__version__,
        "torch.version": torch.__version__,
        "python.version": platform.python_version(),
        "device": device_label,
        "host": platform.node(),
        **process_tags(),
    }
    for key, value in plugins.items():
        tags[f"dbx.plugin.{key}"] = value
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@dataclass
class TrackedRun:
    """One MLflow run, open for logging. ``log_epoch`` is what the training loop calls."""

    client: Any
    run_id: str
    experiment_id: str
    uri: str
    _monitor: Any = None
    _pending: list[Any] = field(default_factory=list)
    already_logged: set[int] = field(default_factory=set)  # epochs a resumed run must not log twice
    summary_logged: set[str] = field(default_factory=set)  # summary values a resumed run has already

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch in self.already_logged:
            return  # a resume that fell back to an older checkpoint redoes an epoch the store has
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), now, epoch) for key, value in metrics.items())
        self.flush()

    def flush(self) -> None:
        while self._pending:
            chunk, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS):
            self.client.log_batch(self.run_id, tags=items[i:i + MAX_PARAMS])

    def finish(self, status: str, *, summary: dict[str, Any] | None = None, history: list[dict[str, float]] | None = None,
               step: int = 0, failure: dict[str, Any] | None = None) -> None:
        """End the run: summary metrics and artifacts, failure tags, plots, then the status."""
        try:
            self.flush()
            if summary is not None:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                numbers = {k: v for k, v in summary.items()
                           if isinstance(v, (int, float)) and v is not None and k not in self.summary_logged}
                self._pending = [Metric(k, float(v), now, step) for k, v in numbers.items()]
                self.flush()
                self.log_text(json.dumps(summary, indent=2), "summary.json")
            if failure:
                self.set_tags({f"dbx.failure.{k}": v for k, v in failure.items() if v is not None})
            if history:
                self._log_plots(history)
        finally:
            if self._monitor is not None:
                self._monitor.finish()
            self.client.set_terminated(self.run_id, status=status)

    def _log_plots(self, history: list[dict[str, float]]) -> None:
        from dbx.plots import training_curves

        figure = training_curves(history)
        try:
            self.client.log_figure(self.run_id, figure, "plots/training_curves.png")
        finally:
            import matplotlib.pyplot as plt

            plt.close(figure)


def open_run(spec: Any, *, uri: str, experiment: str | None, run_name: str, device_label: str,
             plugins: dict[str, str], parent_run_id: str | None = None) -> TrackedRun:
    """Create the MLflow run with the spec's params, the environment's tags and the spec as artifacts."""
    client = _client(uri)
    experiment_id = ensure_experiment(client, uri, experiment or spec.tracking.experiment or spec.name)
    tags = environment_tags(device_label, plugins)
    tags["dbx.spec.name"] = spec.name
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=tags, run_name=run_name)
    tracked = TrackedRun(client, run.info.run_id, experiment_id, uri)
    with _closed_if_interrupted(tracked):
        _log_spec(tracked, spec)
        if spec.tracking.system_metrics:
            tracked._monitor = _start_system_metrics(run.info.run_id, uri)
    return tracked


@contextlib.contextmanager
def _closed_if_interrupted(tracked: TrackedRun) -> Iterator[None]:
    """A run being set up when Ctrl-C, SIGTERM or an error comes must not stay RUNNING."""
    try:
        yield
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            tracked.set_tags({"dbx.failure.reason": "interrupted" if status == "KILLED" else "exception",
                              "dbx.failure.message": f"stopped while the run was being set up: {exc!r}"})
            tracked.client.set_terminated(tracked.run_id, status=status)
        raise


def _log_spec(tracked: TrackedRun, spec: Any) -> None:
    """The flattened spec as params, and the spec as given and as resolved as artifacts."""
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in spec.flat_params().items()]
    for i in range(0, len(params), MAX_PARAMS):
        tracked.client.log_batch(tracked.run_id, params=params[i:i + MAX_PARAMS])
    if spec.source_text:
        tracked.log_text(spec.source_text, f"spec/{Path(spec.source_path or 'spec.yaml').name}")
    tracked.log_text(spec.resolved_yaml(), "spec/resolved.yaml")


def checkpoint_folder(uri: str, configured: str | None, run_id: str) -> Path:
    """Where a run's checkpoints go: the spec's checkpoint.dir, else beside a local store."""
    return checkpoint_base(uri, configured) / run_id


def checkpoint_base(uri: str, configured: str | None) -> Path:
    """The folder that holds one folder of checkpoints per run (checked before a run starts)."""
    if configured:
        base = Path(configured).expanduser()
    elif uri.startswith("sqlite:///"):
        base = Path(uri[len("sqlite:///"):]).parent / "dbx-checkpoints"
    elif "://" not in uri:
        base = Path(uri).parent / "dbx-checkpoints"
    else:
        base = Path("dbx-checkpoints")
    return base.resolve()


def find_run(uri: str, run_id: str) -> Any:
    """The MLflow run ``run_id`` in the store at ``uri``, or a UserError (creating nothing)."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise UserError(f"there is no MLflow store at {uri}, so no run {run_id} to resume. "
                        f"Pass the store the run was logged to with --tracking-uri.")
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run {run_id!r} in {uri}. Check the id in the MLflow UI ({ui_command(uri)}), "
                        f"or pass the right store with --tracking-uri.") from None


def check_resumable(run: Any, *, force: bool = False) -> None:
    """A run may be continued unless its process may still be driving it (whether a FINISHED run
    has anything left to train, its checkpoints say)."""
    from dbx import liveness

    run_id, status, tags = run.info.run_id, run.info.status, run.data.tags
    if status != "RUNNING":
        return
    state = liveness.process_state(tags)
    if state == liveness.ALIVE:
        raise UserError(f"run {run_id} is still running ({liveness.describe(tags)}); stop that process "
                        f"first (kill {tags[liveness.PID_TAG]}: it is then marked KILLED) and resume it after.")
    if state == liveness.ELSEWHERE and not force:
        raise UserError(f"run {run_id} is RUNNING on another machine ({liveness.describe(tags)}), which dbx "
                        f"cannot check from here. If that process is gone, resume with --force.")


def reopen_run(uri: str, run_id: str, history: list[dict[str, float]], *, force: bool = False) -> TrackedRun:
    """Continue logging into an existing run: status RUNNING again, driven by this process, and
    the epochs it is missing.

    The run is checked again and claimed under the store's lock, so two ``dbx resume``s of one
    run cannot both continue it. Its old failure tags go (the reason stays in ``dbx.resume.N``).
    A run killed between its checkpoint and its metrics has epochs in ``history`` that the store
    lacks; they are logged now, so every epoch appears exactly once.
    """
    from dbx.store import store_lock

    client = _client(uri)
    with store_lock(uri):
        run = client.get_run(run_id)
        check_resumable(run, force=force)
        client.update_run(run_id, status="RUNNING")
    tags = run.data.tags
    tracked = TrackedRun(client, run_id, run.info.experiment_id, uri)
    resumes = int(tags.get("dbx.resumes", "0")) + 1
    tracked.set_tags({**process_tags(), "dbx.resumes": resumes,
                      f"dbx.resume.{resumes}": f"was {run.info.status}: {tags.get('dbx.failure.reason', '-')}"})
    for key in [k for k in tags if k.startswith("dbx.failure.")]:
        client.delete_tag(run_id, key)
    logged = {m.step for m in client.get_metric_history(run_id, "epoch_seconds")}
    for entry in history:
        if int(entry["epoch"]) not in logged:
            tracked.log_epoch(int(entry["epoch"]), {k: v for k, v in entry.items() if k != "epoch"})
    tracked.already_logged = logged
    tracked.summary_logged = set(run.data.metrics)
    system_metrics = run.data.params.get("tracking.system_metrics", "False").lower() == "true"
    if system_metrics:
        tracked._monitor = _start_system_metrics(run_id, uri)
    return tracked


def logged_spec(uri: str, run_id: str) -> str | None:
    """The resolved spec a run logged when it started (``spec/resolved.yaml``), None if it has none."""
    import tempfile

    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = _client(uri).download_artifacts(run_id, "spec/resolved.yaml", folder)
        except (MlflowException, OSError):
            return None
        return Path(path).read_text()


@dataclass
class StaleRun:
    run_id: str
    name: str
    experiment: str
    process: str  # e.g. "pid 4242 on host gpu3"


def find_stale(uri: str) -> list[StaleRun]:
    """Every RUNNING run in the store whose process, on this machine, is gone (``dbx.liveness``).
    A sqlite store that does not exist has none, and is not created."""
    from dbx import liveness
    from dbx.store import sqlite_path

    database = sqlite_path(uri)
    if database is not None and not database.exists():
        return []
    client = _client(uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    if not experiments:
        return []
    running = client.search_runs(list(experiments), "attributes.status = 'RUNNING'", max_results=5000)
    return [StaleRun(r.info.run_id, r.info.run_name or r.info.run_id, experiments[r.info.experiment_id],
                     liveness.describe(r.data.tags))
            for r in running if liveness.process_state(r.data.tags) == liveness.GONE]


def mark_stale(uri: str, *, say: Any = None) -> list[StaleRun]:
    """Mark each stale run KILLED, with ``dbx.failure.reason = process_gone`` and a message saying
    what happened; return them. Checked again, run by run, under the store's lock."""
    from dbx import liveness
    from dbx.store import store_lock

    stale = find_stale(uri)
    if not stale:
        return []
    client = _client(uri)
    marked = []
    for found in stale:
        with store_lock(uri):
            run = client.get_run(found.run_id)
            if run.info.status != "RUNNING" or liveness.process_state(run.data.tags) != liveness.GONE:
                continue  # resumed or closed meanwhile
            message = liveness.gone_message(found.process)
            from mlflow.entities import RunTag

            client.log_batch(found.run_id, tags=[RunTag("dbx.failure.reason", "process_gone"),
                                                 RunTag("dbx.failure.message", message)])
            client.set_terminated(found.run_id, status="KILLED")
        marked.append(found)
        if say is not None:
            say(f"marked run {found.name} ({found.run_id}) KILLED: {message}. "
                f"Continue it with: dbx resume {found.run_id} --tracking-uri {uri}")
    return marked


def mark_stale_if_writable(uri: str, *, say: Any) -> None:
    """``mark_stale`` for a command whose own work does not need it (``dbx ui``): a read-only store
    or a failing server is not a reason to refuse; it is said, and the command goes on."""
    from dbx.store import sqlite_path

    database = sqlite_path(uri)
    if database is not None and not (os.access(database, os.W_OK) and os.access(database.parent, os.W_OK)):
        return
    try:
        mark_stale(uri, say=say)
    except Exception as exc:  # noqa: BLE001 - an extra, never the command's reason to fail
        say(f"note: could not check {uri} for runs whose process is gone ({type(exc).__name__})")


def describe_runs(uri: str, *, experiment: str | None = None, limit: int = 20) -> list[str]:
    """``dbx runs``: the newest runs, one line each, with the state of a RUNNING run's process."""
    from dbx import liveness

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise UserError(f"there is no MLflow store at {uri}. Run `dbx run SPEC` first, or pass the store "
                        f"with --tracking-uri.")
    check_store(uri, writing=False)
    client = _client(uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    if experiment is not None:
        chosen = {i: n for i, n in experiments.items() if n == experiment}
        if not chosen:
            raise UserError(f"no experiment {experiment!r} in {uri} (experiments there: "
                            f"{', '.join(sorted(experiments.values())) or 'none'}).")
        experiments = chosen
    found = client.search_runs(list(experiments), order_by=["attributes.start_time DESC"],
                               max_results=limit) if experiments else []
    notes = {liveness.ALIVE: "process alive", liveness.GONE: "process gone: dbx runs --stale marks it",
             liveness.ELSEWHERE: "on another machine", liveness.UNKNOWN: "process not recorded"}
    lines = [f"{'status':<9} {'run id':<32}  {'experiment':<16} {'started':<16}  name"]
    for run in found:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000))
        line = (f"{run.info.status:<9} {run.info.run_id:<32}  {experiments[run.info.experiment_id][:16]:<16} "
                f"{started:<16}  {run.info.run_name or ''}")
        if run.info.status == "RUNNING":
            line += f"  ({liveness.describe(run.data.tags)}, {notes[liveness.process_state(run.data.tags)]})"
        lines.append(line)
    if not found:
        lines.append("(no runs)")
    return lines


def _start_system_metrics(run_id: str, uri: str) -> Any:
    """MLflow's own CPU/memory/GPU sampler, every 10 s, in a background thread."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception:  # noqa: BLE001 - system metrics are a nicety; never fail a run for them
        return None


# --------------------------------------------------------------------------------------------
# Sweeps, comparisons and the UI
# --------------------------------------------------------------------------------------------

SWEEP_TAG = "dbx.sweep"  # "true" on a sweep's parent run


def open_sweep_run(spec: Any, *, uri: str, experiment: str | None, points: dict[str, str]) -> TrackedRun:
    """The parent run of a sweep, named after the spec: its params and files, and its points
    (run name -> varied values) as ``sweep/points.txt``. The children name it as their parent."""
    import dbx

    client = _client(uri)
    experiment_id = ensure_experiment(client, uri, experiment or spec.tracking.experiment or spec.name)
    tags = {SWEEP_TAG: "true", "dbx.spec.name": spec.name, "dbx.version": dbx.__version__,
            "dbx.sweep.points": str(len(points)), **process_tags()}
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = client.create_run(experiment_id, tags=tags, run_name=spec.name)
    tracked = TrackedRun(client, run.info.run_id, experiment_id, uri)
    with _closed_if_interrupted(tracked):
        _log_spec(tracked, spec)
        tracked.log_text("".join(f"{name}  {label}\n" for name, label in points.items()), "sweep/points.txt")
    return tracked


def record_failed_point(spec: Any, *, uri: str, experiment: str | None, run_name: str, parent_run_id: str,
                        message: str, reason: str = "input") -> str:
    """A FAILED child run for a sweep point that could not start (its own input was wrong, or a
    plugin crashed while being built), so the UI shows the point and why; nothing was trained for
    it. Returns the run id."""
    from mlflow.entities import Param

    client = _client(uri)
    experiment_id = ensure_experiment(client, uri, experiment or spec.tracking.experiment or spec.name)
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={"mlflow.parentRunId": parent_run_id, "dbx.spec.name": spec.name,
                                  "dbx.failure.reason": reason, "dbx.failure.message": message[:5000]})
    params = [Param(k, v[:6000]) for k, v in spec.flat_params().items()]
    for i in range(0, len(params), MAX_PARAMS):
        client.log_batch(run.info.run_id, params=params[i:i + MAX_PARAMS])
    client.set_terminated(run.info.run_id, status="FAILED")
    return run.info.run_id


@dataclass
class RunRecord:
    """One run as ``dbx compare`` reads it: who it is, and its per-epoch metrics (step -> value)."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    history: dict[str, dict[int, float]]


COMPARED_METRICS = ("test_accuracy", "test_perplexity", "test_loss", "epoch_seconds", "eval_seconds",
                    "train_seconds", "wall_seconds", "batch_size", "lr", "samples_seen", "diversity",
                    "diversity_samples")


def runs_to_compare(uri: str, *, experiment: str | None = None, parent: str | None = None) -> tuple[str, list[RunRecord]]:
    """The training runs of a sweep (``parent``), of an experiment, or else of the latest sweep in
    the store, oldest first, with their per-epoch metrics. Returns a description of the selection
    too. Sweep parents themselves are left out. A store, experiment or run that is not there is a
    UserError."""

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise UserError(f"there is no MLflow store at {uri}. Run `dbx run SPEC` first, or pass the store "
                        f"with --tracking-uri.")
    check_store(uri, writing=False)
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    order = ["attributes.start_time ASC"]
    if parent is None and experiment is None:
        ids = [e.experiment_id for e in client.search_experiments()]
        latest = client.search_runs(ids, f"tags.`{SWEEP_TAG}` = 'true'", order_by=["attributes.start_time DESC"],
                                    max_results=1) if ids else []
        if not latest:
            raise UserError(f"no sweep in {uri}: name the runs to compare with --experiment NAME or --parent RUN_ID.")
        parent = latest[0].info.run_id
    if parent is not None:
        try:
            parent_run = client.get_run(parent)
        except MlflowException:
            raise UserError(f"no run {parent!r} in {uri}. Copy the sweep's run id from `dbx run`'s output "
                            f"or the MLflow UI, or pass the right store with --tracking-uri.") from None
        found = client.search_runs([parent_run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'",
                                   order_by=order, max_results=5000)
        what = f"sweep {parent_run.info.run_name} ({parent})"
        if not found:
            raise UserError(f"{what} in {uri} has no runs under it; give a sweep's parent run id, or use "
                            f"--experiment NAME.")
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise UserError(f"no experiment {experiment!r} in {uri} (experiments there: {names}).")
        found = [r for r in client.search_runs([exp.experiment_id], order_by=order, max_results=5000)
                 if r.data.tags.get(SWEEP_TAG) != "true"]
        what = f"experiment {experiment}"
        if not found:
            raise UserError(f"{what} in {uri} has no runs. Train some first, e.g. dbx run experiments/synthetic/sweep.yaml")
    records = []
    for run in found:
        history = {key: _per_step(client.get_metric_history(run.info.run_id, key)) for key in COMPARED_METRICS}
        records.append(RunRecord(run.info.run_id, run.info.run_name or run.info.run_id, run.info.status,
                                 dict(run.data.params), dict(run.data.tags), history))
    return what, records


def _per_step(metrics: list[Any]) -> dict[int, float]:
    """One value per step: the first logged. A run's summary re-logs ``eval_seconds`` (the total)
    at the last epoch's step, after that epoch's own value; on a tie the smaller value is the
    epoch's own (the total includes it)."""
    chosen: dict[int, Any] = {}
    for m in metrics:
        held = chosen.get(m.step)
        if held is None or (m.timestamp, m.value) < (held.timestamp, held.value):
            chosen[m.step] = m
    return {step: m.value for step, m in chosen.items()}


def log_files(uri: str, run_id: str, files: dict[str, str]) -> None:
    """Attach local files to a run as artifacts: artifact path (folder/name) -> local path."""
    client = _client(uri)
    for artifact_path, local in files.items():
        folder = str(Path(artifact_path).parent)
        client.log_artifact(run_id, local, None if folder == "." else folder)


def ui_server(uri: str, *, port: int, host: str = "127.0.0.1") -> tuple[list[str], dict[str, str]]:
    """The ``mlflow ui`` command line (from the Python that runs dbx) and its environment.

    One worker, and no GenAI job runner (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``, unless set
    already): a local browser for training runs starts in seconds instead of spawning a dozen
    processes.
    """
    import sys

    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]
    return argv, env


def ui_address(host: str, port: int) -> str:
    """Where the UI opens on the training-runs view: MLflow 3 decides the view by its
    ``workflowType`` (remembered in the browser), not only by the experiment's tag."""
    return f"http://{host}:{port}/#/experiments?workflowType=machine_learning"


def log_diversity(meter: Any, *, step: int | None = None, per_layer: bool = False,
                  extra: dict[str, float] | None = None) -> dict[str, float]:
    """Log a ``DiversityMeter``'s last estimate (or a ``DiversityEstimate``) to the active MLflow run.

    One ``log_metrics`` call (``diversity``, ``diversity_samples``, ``diversity_sum_sq_norms``,
    ``diversity_sq_norm_of_sum``, ``estimator_seconds``; with ``per_layer`` one
    ``diversity/<module path>`` each; plus ``extra``, e.g. ``{"batch_size": b}``), at ``step``
    (use the epoch, as ``dbx run`` does). Returns what it logged. There must be an active run
    (``with mlflow.start_run():``): creating one behind your back would scatter epochs over runs.
    """
    import mlflow

    from dbx.protocols import DiversityEstimate

    if mlflow.active_run() is None:
        raise UserError("log_diversity: no active MLflow run; wrap the training loop in "
                        "`with mlflow.start_run():` (or start one with mlflow.start_run() first)")
    if isinstance(meter, DiversityEstimate):
        metrics = {"diversity": meter.value, "diversity_samples": float(meter.samples),
                   "estimator_seconds": meter.seconds}
        if meter.sum_sq_norms is not None:
            metrics["diversity_sum_sq_norms"] = float(meter.sum_sq_norms)
        if meter.sq_norm_of_sum is not None:
            metrics["diversity_sq_norm_of_sum"] = float(meter.sq_norm_of_sum)
        if per_layer:
            metrics.update({f"diversity/{key}": value for key, value in meter.per_layer.items()})
    else:
        metrics = meter.metrics(per_layer=per_layer)
    metrics.update({key: float(value) for key, value in (extra or {}).items()})
    mlflow.log_metrics(metrics, step=step)
    return metrics

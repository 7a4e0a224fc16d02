"""Everything MLflow: where the store is, the run's lifecycle, params, metrics, artifacts, tags.

Metrics are buffered and written with one ``log_batch`` per epoch: on a sqlite store one
``log_metric`` call costs about 9 ms and ``log_batch`` about 0.16 ms per value, so logging never
shows in the training step. The client API is used throughout (no fluent global state), so
several runs can be driven from one process, e.g. a sweep or the tests.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbx.errors import UserError

DEFAULT_DB = "mlflow.db"  # MLflow's own default store name: a plain `mlflow ui` in the same folder shows it
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # makes the MLflow 3 UI open on the training-runs view
MAX_BATCH = 1000
MAX_PARAMS = 100


def resolve_tracking_uri(cli_uri: str | None = None, spec_uri: str | None = None) -> str:
    """--tracking-uri, else the spec's tracking.uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db.

    A relative sqlite path is made absolute, so that the printed ``mlflow ui`` command works from
    any folder.
    """
    uri = cli_uri or spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    elif "://" not in uri:  # a plain folder: MLflow's file store
        uri = str(Path(uri).expanduser().resolve())
    return uri


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


def check_store(uri: str) -> None:
    """Fail early, before any training, when the store cannot be reached or written."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise UserError(f"tracking store {uri}: folder {folder} does not exist. Create it or choose "
                            f"another --tracking-uri.")
        if not os.access(folder, os.W_OK):
            raise UserError(f"tracking store {uri}: folder {folder} is not writable. Choose another --tracking-uri.")
    elif uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)  # noqa: S310 - user's own server
        except Exception as exc:  # noqa: BLE001 - any failure means unreachable
            raise UserError(f"tracking server {uri} cannot be reached ({exc}). Start it, fix --tracking-uri, "
                            f"or unset MLFLOW_TRACKING_URI to use the local ./mlflow.db.") from exc


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a local store, as an absolute path (MLflow otherwise uses the current folder)."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
    if "://" not in uri:
        return None  # the file store keeps artifacts inside its own folder
    return None  # a server decides


def ensure_experiment(client: Any, uri: str, name: str) -> str:
    """The experiment's id, creating it (tagged for the training-runs view) when new."""
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

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
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
                numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None}
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
    from mlflow.entities import Param

    client = _client(uri)
    experiment_id = ensure_experiment(client, uri, experiment or spec.tracking.experiment or spec.name)
    tags = environment_tags(device_label, plugins)
    tags["dbx.spec.name"] = spec.name
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=tags, run_name=run_name)
    tracked = TrackedRun(client, run.info.run_id, experiment_id, uri)
    params = [Param(k, v[:6000]) for k, v in spec.flat_params().items()]
    for i in range(0, len(params), MAX_PARAMS):
        client.log_batch(run.info.run_id, params=params[i:i + MAX_PARAMS])
    if spec.source_text:
        tracked.log_text(spec.source_text, f"spec/{Path(spec.source_path or 'spec.yaml').name}")
    tracked.log_text(spec.resolved_yaml(), "spec/resolved.yaml")
    if spec.tracking.system_metrics:
        tracked._monitor = _start_system_metrics(run.info.run_id, uri)
    return tracked


def _start_system_metrics(run_id: str, uri: str) -> Any:
    """MLflow's own CPU/memory/GPU sampler, every 10 s, in a background thread."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception:  # noqa: BLE001 - system metrics are a nicety; never fail a run for them
        return None

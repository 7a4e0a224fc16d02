"""One training run: checked spec -> parts -> MLflow run -> training -> summary (and its resume).

The order matters: everything that can be wrong with the user's input is found before an
MLflow run is created, so a bad spec leaves no trace in the store.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from dbx.checks import describe_plugins
from dbx.errors import RunFailed, UserError

Say = Callable[[str], None]


@dataclass
class RunResult:
    exit_code: int  # 0 finished, 1 failed, 130 interrupted
    run_id: str | None = None
    summary: dict[str, Any] | None = None


def run_one(spec: Any, *, uri: str, experiment: str | None = None, say: Say = print,
            parent_run_id: str | None = None, run_name: str | None = None) -> RunResult:
    """Train one (sweep-free) spec into a new MLflow run.

    Input errors (device, store, data, plugin construction) raise ``UserError`` before any run
    exists. A failure during training marks the run FAILED and raises ``RunFailed``; Ctrl-C marks
    it KILLED and returns exit code 130.
    """
    from dbx import tracking
    from dbx.train.checkpoint import check_folder
    from dbx.train.loop import RunState
    from dbx.train.parts import build_parts

    tracking.quiet_mlflow()
    device, label = _device(spec)
    tracking.check_store(uri)
    if spec.checkpoint.enabled:  # a folder that cannot be written fails now, not after epoch 1
        check_folder(tracking.checkpoint_base(uri, spec.checkpoint.dir))
    parts = build_parts(spec, device)
    run_name = run_name or f"{spec.name}-seed{spec.seed}"
    from mlflow.exceptions import MlflowException

    try:
        tracked = tracking.open_run(spec, uri=uri, experiment=experiment, run_name=run_name, device_label=label,
                                    plugins=describe_plugins(spec), parent_run_id=parent_run_id)
    except MlflowException as exc:
        raise UserError(f"MLflow store {uri} refused the run: {exc.message}") from exc
    say(f"run {run_name} ({tracked.run_id}) on {label}")
    say(f"tracking: {uri}   browse with: {tracking.ui_command(uri)}")
    say(f"data: {parts.train_loader.num_samples} training samples; model: {spec.model.name} "
        f"({sum(p.numel() for p in parts.model.parameters()):,} parameters); policy: {spec.policy.name}")
    state = RunState(batch_size=parts.policy.initial_batch_size())
    return _train(spec, parts, tracked, state, say)


def resume_run(run_id: str, *, tracking_uri: str | None = None, device: str | None = None,
               say: Say = print) -> int:
    """Continue run ``run_id`` from its newest intact checkpoint, in the same MLflow run."""
    from dbx import tracking
    from dbx.spec import spec_from_dict
    from dbx.train.checkpoint import check_folder, check_payload, load_latest, remove_stale_temporaries
    from dbx.train.parts import build_parts

    tracking.quiet_mlflow()
    uri = tracking.resolve_tracking_uri(tracking_uri)
    run = tracking.find_run(uri, run_id)
    folder = run.data.tags.get("dbx.checkpoint.dir")
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        latest = load_latest(folder) if folder else None
    for warning in skipped:
        say(f"warning: {warning.message}")
    if latest is None:
        where = f" in {folder}" if folder else ""
        raise UserError(f"run {run_id} has no checkpoint{where} to resume from; start it again with dbx run.")
    path, payload = latest
    data = check_payload(path, payload)["spec"]
    if device:
        data = {**data, "device": device}
    spec = spec_from_dict(data, source=f"the spec saved in {path.name}")
    device_, label = _device(spec)
    check_folder(folder, what=f"the checkpoint folder of run {run_id}")
    parts = build_parts(spec, device_)
    state, drift = _restore(spec, parts, path, payload)
    if state.epoch >= spec.epochs:
        raise UserError(f"run {run_id} already completed all {spec.epochs} epochs; nothing to resume.")
    for stale in remove_stale_temporaries(folder):
        say(f"removed {stale.name}, left by a checkpoint write that never finished")
    tracked = tracking.reopen_run(uri, run_id, state.history)
    say(f"resuming run {run.info.run_name} ({run_id}) after epoch {state.epoch}, from {path}, on {label}")
    for message in drift:
        say(f"WARNING: {message}")
    if drift:
        tracked.set_tags({"dbx.resume.warning": " | ".join(drift)[:5000]})
    return _train(spec, parts, tracked, state, say).exit_code


def _restore(spec: Any, parts: Any, path: Any, payload: dict[str, Any]) -> tuple[Any, list[str]]:
    """The checkpoint loaded into ``parts``, and the warnings of the drift check (dbx.train.drift)."""
    from dbx import registry
    from dbx.train.checkpoint import ForeignCheckpoint, restore
    from dbx.train.drift import resume_warnings

    try:
        state = restore(parts, payload)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ForeignCheckpoint(f"{path} does not fit the run its spec describes ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it to resume from the "
                                f"checkpoint before it, or start the run again with dbx run") from exc

    def build_policy() -> Any:
        return registry.build("policy", spec.policy.name, spec.policy.params,
                              dataset_size=parts.train_loader.num_samples, seed=spec.seed)

    drift = resume_warnings(payload, policy=parts.policy, estimator=parts.estimator, policy_name=spec.policy.name,
                            estimator_name=spec.estimator.name, build_policy=build_policy)
    return state, drift


def _device(spec: Any) -> tuple[Any, str]:
    import torch

    from dbx.train.device import device_name, resolve_device

    device = resolve_device(spec.device)
    return device, f"{device.type} ({device_name(device)}), torch {torch.__version__}"


def _train(spec: Any, parts: Any, tracked: Any, state: Any, say: Say) -> RunResult:
    """Run the loop with end-of-epoch checkpoints; close the MLflow run with the right status."""
    from dbx import tracking
    from dbx.train.checkpoint import save_checkpoint, snapshot
    from dbx.train.drift import RecordedPolicy
    from dbx.train.loop import fit

    on_epoch_end = None
    if spec.checkpoint.enabled:
        folder = tracking.checkpoint_folder(tracked.uri, spec.checkpoint.dir, tracked.run_id)
        tracked.set_tags({"dbx.checkpoint.dir": str(folder)})
        parts.policy = RecordedPolicy(parts.policy, spec.policy.name)  # its last decision goes in the checkpoint

        def on_epoch_end(current: Any) -> None:
            try:
                save_checkpoint(folder, current.epoch, snapshot(spec, parts, current), spec.checkpoint.keep_last)
            except OSError as exc:
                earlier = f"dbx resume {tracked.run_id} continues after epoch {current.epoch - 1}" \
                    if current.epoch > 1 else "no earlier checkpoint exists"
                raise RunFailed(f"could not write the checkpoint of epoch {current.epoch} to {folder}: "
                                f"{exc.strerror or exc}. Free space there or set checkpoint.dir elsewhere; "
                                f"{earlier}", reason="checkpoint_failed", epoch=current.epoch) from exc
            except TypeError as exc:  # a plugin's state_dict() that a checkpoint cannot hold
                raise RunFailed(f"could not checkpoint epoch {current.epoch}: {exc}", reason="checkpoint_failed",
                                epoch=current.epoch) from exc

    resume_hint = f"resume with: dbx resume {tracked.run_id} --tracking-uri {tracked.uri}"
    try:
        summary = fit(spec, parts, tracked, say=say, state=state, on_epoch_end=on_epoch_end)
    except KeyboardInterrupt:
        tracked.finish("KILLED", history=state.history, step=state.epoch,
                       failure={"reason": "interrupted", "epoch": state.epoch + 1})
        say(f"interrupted in epoch {state.epoch + 1}; run {tracked.run_id} marked KILLED. "
            + (resume_hint if on_epoch_end else ""))
        return RunResult(130, tracked.run_id)
    except RunFailed as exc:
        tracked.finish("FAILED", history=state.history, step=state.epoch,
                       failure={"reason": exc.reason, "message": str(exc), "epoch": exc.epoch, "step": exc.step})
        raise
    except Exception as exc:
        tracked.finish("FAILED", history=state.history, step=state.epoch,
                       failure={"reason": "exception", "message": f"{type(exc).__name__}: {exc}",
                                "epoch": state.epoch + 1})
        raise RunFailed(f"{type(exc).__name__}: {exc}", reason="exception", epoch=state.epoch + 1) from exc
    tracked.finish("FINISHED", summary=summary.to_dict(), history=state.history, step=state.epoch)
    say("summary: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                  for k, v in summary.to_dict().items()}))
    say(f"done. browse with: {tracking.ui_command(tracked.uri)}")
    return RunResult(0, tracked.run_id, summary.to_dict())

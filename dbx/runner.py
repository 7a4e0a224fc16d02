"""One training run: checked spec -> parts -> MLflow run -> training -> summary (and its resume).

The order matters: everything that can be wrong with the user's input is found before an
MLflow run is created, so a bad spec leaves no trace in the store. Once the run exists, every
way out (the end, a failure, Ctrl-C or SIGTERM at any point) closes it with a status; only a
SIGKILL cannot, and ``dbx resume`` (or ``dbx runs --stale``) then deals with the RUNNING run
its process left behind.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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

    Under torchrun every rank calls this; rank 0 alone opens the MLflow run (tagged with the world
    size, the backend and each rank's device), prints and writes checkpoints.
    """
    from dbx import distributed, tracking
    from dbx.distributed import ranks
    from dbx.store import check_store
    from dbx.train.checkpoint import check_folder
    from dbx.train.parts import build_parts

    distributed.setup()
    say = ranks.rank0_only(say)
    device, label = _device(spec)
    lead = distributed.rank() == 0
    if lead:
        check_store(uri)
        if spec.checkpoint.enabled:  # a folder that cannot be written fails now, not after epoch 1
            check_folder(tracking.checkpoint_base(uri, spec.checkpoint.dir))
    parts = build_parts(spec, device)
    topology = ranks.topology_tags(device)
    run_name = run_name or f"{spec.name}-seed{spec.seed}"
    from mlflow.exceptions import MlflowException

    tracked: Any = None
    if lead:
        try:
            tracked = tracking.open_run(spec, uri=uri, experiment=experiment, run_name=run_name, device_label=label,
                                        plugins=describe_plugins(spec), parent_run_id=parent_run_id)
        except MlflowException as exc:
            raise UserError(f"MLflow store {uri} refused the run: {exc.message}") from exc
        tracked.set_tags(topology)
    run_id = ranks.from_rank0(tracked.run_id if lead else None)
    tracked = tracked or ranks.SilentRun(run_id, uri)
    intro = [f"run {run_name} ({tracked.run_id}) on {label}",
             f"tracking: {uri}   browse with: {tracking.ui_command(uri)}",
             f"data: {parts.train_loader.num_samples} training samples; model: {spec.model.name} "
             f"({sum(p.numel() for p in parts.model.parameters()):,} parameters); policy: {spec.policy.name}"]
    return _train(spec, parts, tracked, None, say, intro=intro)


def resume_run(run_id: str, *, tracking_uri: str | None = None, device: str | None = None, force: bool = False,
               say: Say = print) -> int:
    """Continue run ``run_id`` in the same MLflow run: from its newest intact checkpoint, or from
    the beginning when it has none (it was killed in its first epoch; its start is fully
    determined by the resolved spec it logged). A run whose checkpoints hold every epoch (it was
    killed while closing) gets what the store lacks and is closed FINISHED.

    Under torchrun every rank calls this, with any number of ranks: rank 0 reads the store and
    tells the others which checkpoint to load (a shared folder); the global batches, and so the
    result on the CPU, do not depend on the number of ranks."""
    from dbx import distributed, tracking
    from dbx.distributed import ranks
    from dbx.train.checkpoint import check_folder, check_payload, read_checkpoint, remove_stale_temporaries
    from dbx.train.parts import build_parts

    distributed.setup()
    say = ranks.rank0_only(say)
    lead = distributed.rank() == 0
    uri = tracking.resolve_tracking_uri(tracking_uri)
    plan = _resume_plan(uri, run_id, force, say) if lead else None
    payload = plan.pop("payload") if lead else None  # the other ranks read the file themselves
    plan = ranks.from_rank0(plan)
    if plan["checkpoint"] is None:
        return _restart(plan, uri=uri, device=device, force=force, say=say)
    path = plan["checkpoint"]
    payload = payload if payload is not None else read_checkpoint(path)
    data = check_payload(path, payload)["spec"]
    if device:
        data = {**data, "device": device}
    from dbx.spec import spec_from_dict

    spec = spec_from_dict(data, source=f"the spec saved in {path.name}")
    device_, label = _device(spec)
    folder = plan["folder"]
    if lead:
        check_folder(folder, what=f"the checkpoint folder of run {run_id}")
    parts = build_parts(spec, device_)
    topology = ranks.topology_tags(device_)
    state, drift = _restore(spec, parts, path, payload)
    if state.epoch >= spec.epochs and plan["status"] == "FINISHED":
        raise UserError(f"run {run_id} has finished; there is nothing to resume. Start a new one with dbx run.")
    if lead:
        for stale in remove_stale_temporaries(folder):
            say(f"removed {stale.name}, left by a checkpoint write that never finished")
        tracked: Any = tracking.reopen_run(uri, run_id, state.history, force=force)
        tracked.set_tags(topology)
    else:
        tracked = ranks.SilentRun(run_id, uri)
    if state.epoch >= spec.epochs:
        say(f"run {plan['run_name']} ({run_id}) had trained all {spec.epochs} epochs when it stopped; "
            f"logging what the store lacked and closing it")
        return _close_finished(spec, tracked, state, say).exit_code
    say(f"resuming run {plan['run_name']} ({run_id}) after epoch {state.epoch}, from {path}, on {label}")
    for message in drift:
        say(f"WARNING: {message}")
    if drift:
        tracked.set_tags({"dbx.resume.warning": " | ".join(drift)[:5000]})
    return _train(spec, parts, tracked, state, say).exit_code


def _resume_plan(uri: str, run_id: str, force: bool, say: Say) -> dict[str, Any]:
    """What rank 0 learns from the store before a resume: the run's name, status and checkpoint
    folder, its newest intact checkpoint (None if it has none) and, without one, its logged spec."""
    from dbx import tracking
    from dbx.store import check_store
    from dbx.train.checkpoint import load_latest

    check_store(uri)
    run = tracking.find_run(uri, run_id)
    tracking.check_resumable(run, force=force)
    folder = run.data.tags.get("dbx.checkpoint.dir")
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        latest = load_latest(folder) if folder else None
    for warning in skipped:
        say(f"warning: {warning.message}")
    plan: dict[str, Any] = {"run_name": run.info.run_name, "status": run.info.status, "folder": folder,
                            "checkpoint": None, "spec": None, "payload": None, "params": dict(run.data.params)}
    if latest is None:
        if run.info.status == "FINISHED":
            raise UserError(f"run {run_id} has finished; there is nothing to resume. Start a new one with dbx run.")
        text = tracking.logged_spec(uri, run_id)
        if text is None:
            raise UserError(f"run {run_id} has no checkpoint, and no spec: it was stopped while it was being "
                            f"set up, before anything was trained. Start it again with dbx run.")
        return {**plan, "run_id": run_id, "spec": text}
    plan["checkpoint"], plan["payload"] = latest
    return plan


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


def _restart(plan: dict[str, Any], *, uri: str, device: str | None, force: bool, say: Say) -> int:
    """Train a run that left no checkpoint again from its first epoch, under its own run id."""
    from dbx import distributed, tracking
    from dbx.distributed import ranks
    from dbx.spec import parse_spec
    from dbx.train.parts import build_parts

    run_id = plan["run_id"]
    spec = parse_spec(plan["spec"], source=f"the resolved spec of run {run_id}",
                      overrides=[f"device={device}"] if device else [])
    device_, label = _device(spec)
    parts = build_parts(spec, device_)
    topology = ranks.topology_tags(device_)
    if distributed.rank() != 0:
        return _train(spec, parts, ranks.SilentRun(run_id, uri), None, say).exit_code
    tracked = tracking.reopen_run(uri, run_id, [], force=force)
    tracked.set_tags(topology)
    logged = sorted(tracked.already_logged)
    kept = f"; the metrics it logged for epochs {logged[0]}-{logged[-1]} are kept" if logged else ""
    say(f"run {plan['run_name']} ({run_id}) has no checkpoint: training it again from the beginning, in the "
        f"same run, from the resolved spec it logged, on {label}{kept}")
    return _train(spec, parts, tracked, None, say, logged_params=plan["params"]).exit_code


def _device(spec: Any) -> tuple[Any, str]:
    import torch

    from dbx.distributed import rank_device, world_size
    from dbx.train.device import device_name, resolve_device

    device = rank_device(resolve_device(spec.device))
    spread = f", {world_size()} processes" if world_size() > 1 else ""
    return device, f"{device.type} ({device_name(device)}), torch {torch.__version__}{spread}"


def _train(spec: Any, parts: Any, tracked: Any, state: Any, say: Say, *, intro: Sequence[str] = (),
           logged_params: dict[str, str] | None = None) -> RunResult:
    """Run the loop with end-of-epoch checkpoints; close the MLflow run with the right status,
    whatever happens from the moment it exists. ``logged_params``: what a restarted run already
    has (MLflow keeps a param's first value: a restart on another number of ranks keeps it)."""
    from dbx import distributed, faults, stopping, tracking
    from dbx.distributed.failures import failure_elsewhere, report_failure
    from dbx.train.drift import RecordedPolicy
    from dbx.train.loop import RunState, fit

    fresh = state is None
    state = state or RunState(batch_size=parts.policy.initial_batch_size())
    folder = None
    resume_hint = f"resume with: dbx resume {tracked.run_id} --tracking-uri {tracked.uri}"

    def on_epoch_end(current: Any) -> None:
        if folder is not None:
            _save_checkpoint(folder, spec, parts, current, tracked.run_id)
        faults.hold(f"checkpoint:{current.epoch}")
        stopping.raise_if_stopped()  # a stop signal whose KeyboardInterrupt a finalizer swallowed

    try:
        for line in intro:
            say(line)
        if fresh:
            tracked.log_params({k: v for k, v in derived_params(parts).items() if k not in (logged_params or {})})
        if spec.checkpoint.enabled and distributed.rank() == 0:  # rank 0 writes every checkpoint
            folder = tracking.checkpoint_folder(tracked.uri, spec.checkpoint.dir, tracked.run_id)
            tracked.set_tags({"dbx.checkpoint.dir": str(folder)})
        if spec.checkpoint.enabled:
            parts.policy = RecordedPolicy(parts.policy, spec.policy.name)  # its last decision goes in the checkpoint
        faults.hold("run-open")
        summary = fit(spec, parts, tracked, say=say, state=state, on_epoch_end=on_epoch_end)
        faults.hold("before-close")
    except KeyboardInterrupt:
        stopping.handled()
        elsewhere = failure_elsewhere()  # torchrun stops every rank when one fails
        if elsewhere is not None:
            failure = {"reason": "rank_failed", "rank": elsewhere["rank"],
                       "message": f"rank {elsewhere['rank']}: {elsewhere['message']}"}
            with stopping.closing():
                _close(tracked, state, "FAILED", say, history=state.history, step=state.epoch,
                       failure={**failure, "epoch": state.epoch + 1})
            raise RunFailed(failure["message"], reason="rank_failed", epoch=state.epoch + 1) from None
        with stopping.closing():
            _close(tracked, state, "KILLED", say, step=state.epoch,
                   failure={"reason": "interrupted", "epoch": state.epoch + 1})
            say(f"interrupted in epoch {state.epoch + 1}; run {tracked.run_id} marked KILLED. "
                + (resume_hint if folder is not None else ""))
        return RunResult(130, tracked.run_id)
    except RunFailed as exc:
        report_failure(str(exc))
        failure = _failure_of_the_job({"reason": exc.reason, "message": str(exc), "epoch": exc.epoch,
                                       "step": exc.step}, failure_elsewhere())
        with stopping.closing():
            _close(tracked, state, "FAILED", say, history=state.history, step=state.epoch, failure=failure)
        if failure.get("rank") is not None and failure["rank"] != distributed.rank():
            raise RunFailed(failure["message"], reason=failure["reason"], epoch=exc.epoch) from exc
        raise
    except Exception as exc:
        failure = _blame(exc, spec, parts)
        report_failure(failure["message"])
        failure = _failure_of_the_job(failure, failure_elsewhere())
        if _unmeasurable(exc):  # the user's model is one the estimator cannot measure: exit 2, not a crash
            with stopping.closing():
                _close(tracked, state, "FAILED", say, history=state.history, step=state.epoch,
                       failure={**failure, "reason": "unsupported_model", "epoch": state.epoch + 1})
            raise
        with stopping.closing():
            _close(tracked, state, "FAILED", say, history=state.history, step=state.epoch,
                   failure={**failure, "epoch": state.epoch + 1})
        raise RunFailed(failure["message"], reason=failure["reason"], epoch=state.epoch + 1) from exc
    return _close_finished(spec, tracked, state, say, summary)


def _failure_of_the_job(mine: dict[str, Any], elsewhere: dict[str, Any] | None) -> dict[str, Any]:
    """The failure the run is closed with: the first rank's that recorded one (under torchrun a
    rank's error often makes the others' collectives fail after it), with its rank in the message;
    in one process, this process's own."""
    from dbx.distributed import rank, world_size

    if world_size() == 1:
        return mine
    if elsewhere is not None and elsewhere["rank"] != rank():
        return {"reason": "rank_failed", "rank": elsewhere["rank"],
                "message": f"rank {elsewhere['rank']}: {elsewhere['message']}"}
    return {**mine, "rank": rank(), "message": f"rank {rank()}: {mine['message']}"}


def _close_finished(spec: Any, tracked: Any, state: Any, say: Say, summary: Any = None) -> RunResult:
    """Log the summary (what the store does not have yet) and close the run FINISHED."""
    from dbx import stopping, tracking
    from dbx.train.loop import summarize

    summary = summary or summarize(spec, state)
    with stopping.closing():  # the work is done: a signal now must not leave the run half closed
        _log_throughput(tracked, state)
        tracked.finish("FINISHED", summary=summary.to_dict(), history=state.history, step=state.epoch)
    say("summary: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                  for k, v in summary.to_dict().items() if v is not None}))
    say(f"done. browse with: {tracking.ui_command(tracked.uri)}")
    return RunResult(0, tracked.run_id, summary.to_dict())


def _close(tracked: Any, state: Any, status: str, say: Say, **details: Any) -> None:
    """Close the run with ``status``; if the store itself fails (a full disk), say so, and leave the
    run for ``dbx runs --stale`` to mark once the store works again."""
    try:
        _log_throughput(tracked, state)
        tracked.finish(status, **details)
    except Exception as exc:  # noqa: BLE001 - the reason the run is closing matters more
        say(f"warning: could not mark run {tracked.run_id} {status} in {tracked.uri} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); once the store works again, "
            f"`dbx runs --stale` marks it")


def _log_throughput(tracked: Any, state: Any) -> None:
    """``throughput.json``: samples per second of each batch size the run trained at (goodput's inputs)."""
    from dbx.train import throughput

    if state.throughput:
        tracked.log_text(json.dumps(throughput.as_records(state.throughput), indent=2), "throughput.json")


def derived_params(parts: Any) -> dict[str, Any]:
    """What a run's numbers depend on beyond its spec, so a policy's decisions can be replayed from
    the store alone: the training-set size n (DiveBatch's ``delta * n * diversity``), the test-set
    size, the number of processes that share each batch, and the model's size."""
    return {"dbx.train_size": parts.train_loader.num_samples, "dbx.test_size": parts.test_loader.num_samples,
            "dbx.world_size": _world_size(), "dbx.model_parameters": sum(p.numel() for p in parts.model.parameters())}


def _world_size() -> int:
    from dbx.distributed import world_size

    return world_size()


def _save_checkpoint(folder: Any, spec: Any, parts: Any, state: Any, run_id: str) -> None:
    from dbx.train.checkpoint import save_checkpoint, snapshot

    try:
        save_checkpoint(folder, state.epoch, snapshot(spec, parts, state), spec.checkpoint.keep_last)
    except OSError as exc:
        earlier = f"dbx resume {run_id} continues after epoch {state.epoch - 1}" \
            if state.epoch > 1 else "no earlier checkpoint exists"
        raise RunFailed(f"could not write the checkpoint of epoch {state.epoch} to {folder}: "
                        f"{exc.strerror or exc}. Free space there or set checkpoint.dir elsewhere; "
                        f"{earlier}", reason="checkpoint_failed", epoch=state.epoch) from exc
    except TypeError as exc:  # a plugin's state_dict() that a checkpoint cannot hold
        raise RunFailed(f"could not checkpoint epoch {state.epoch}: {exc}", reason="checkpoint_failed",
                        epoch=state.epoch) from exc


def _unmeasurable(exc: BaseException) -> bool:
    """An estimator's self-check (or a hook) found that it cannot measure this model correctly."""
    import sys

    hooks = sys.modules.get("dbx.estimators.hooks")
    return hooks is not None and isinstance(exc, hooks.EstimatorConfigError)


def _blame(exc: BaseException, spec: Any, parts: Any) -> dict[str, str]:
    """The failure tags of an unexpected exception, naming the plugin that raised it, if one did."""
    from dbx.blame import plugin_call

    culprit = plugin_call(exc, spec, parts)
    text = f"{type(exc).__name__}: {exc}"
    if culprit is None:
        return {"reason": "exception", "message": text}
    return {"reason": "exception", "message": f"{culprit.describe()}: {text}", "plugin": culprit.plugin,
            "call": culprit.call}

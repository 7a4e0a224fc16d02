"""One ``dbx run``: spec -> checks -> parts -> MLflow run -> training -> summary.

The order matters: everything that can be wrong with the user's input is found before an
MLflow run is created, so a bad spec leaves no trace in the store.
"""
from __future__ import annotations

import json
from typing import Callable, Sequence

from dbx.checks import check_spec_file, describe_plugins
from dbx.errors import RunFailed


def run_spec(path: str, overrides: Sequence[str] = (), *, tracking_uri: str | None = None,
             experiment: str | None = None, say: Callable[[str], None] = print) -> int:
    """Run the spec at ``path``; return the exit code (0 finished, 1 failed, 130 interrupted)."""
    spec = check_spec_file(path, overrides)

    import torch

    from dbx import tracking
    from dbx.train.device import device_name, resolve_device
    from dbx.train.loop import fit
    from dbx.train.parts import build_parts

    device = resolve_device(spec.device)
    uri = tracking.resolve_tracking_uri(tracking_uri, spec.tracking.uri)
    tracking.check_store(uri)
    parts = build_parts(spec, device)
    label = f"{device.type} ({device_name(device)}), torch {torch.__version__}"
    run_name = f"{spec.name}-seed{spec.seed}"
    tracked = tracking.open_run(spec, uri=uri, experiment=experiment, run_name=run_name,
                                device_label=label, plugins=describe_plugins(spec))
    say(f"run {run_name} ({tracked.run_id}) on {label}")
    say(f"tracking: {uri}   browse with: {tracking.ui_command(uri)}")
    say(f"data: {parts.train_loader.num_samples} training samples; model: {spec.model.name} "
        f"({sum(p.numel() for p in parts.model.parameters()):,} parameters); policy: {spec.policy.name}")

    from dbx.train.loop import RunState

    state = RunState(batch_size=parts.policy.initial_batch_size())
    try:
        summary = fit(spec, parts, tracked, say=say, state=state)
    except KeyboardInterrupt:
        tracked.finish("KILLED", history=state.history, step=state.epoch,
                       failure={"reason": "interrupted", "epoch": state.epoch})
        say(f"interrupted after epoch {state.epoch}; run {tracked.run_id} marked KILLED")
        return 130
    except RunFailed as exc:
        tracked.finish("FAILED", history=state.history, step=state.epoch,
                       failure={"reason": exc.reason, "message": str(exc), "epoch": exc.epoch, "step": exc.step})
        raise
    except Exception as exc:
        tracked.finish("FAILED", history=state.history, step=state.epoch,
                       failure={"reason": "exception", "message": f"{type(exc).__name__}: {exc}",
                                "epoch": state.epoch + 1})
        raise RunFailed(f"{type(exc).__name__}: {exc}", reason="exception") from exc
    tracked.finish("FINISHED", summary=summary.to_dict(), history=state.history, step=state.epoch)
    say("summary: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                  for k, v in summary.to_dict().items()}))
    say(f"done. browse with: {tracking.ui_command(uri)}")
    return 0

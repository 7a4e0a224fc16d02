"""Which plugin raised? A run that fails with a plugin's exception names the plugin, its
distribution and the call, e.g. ``policy 'x' (dbx-foo 0.1) raised in next_batch_size``.

Nothing on the training step's path pays for this: the answer is read from the traceback once the
run has failed. Its frames are walked from the training loop inwards; a frame belongs to a plugin
when its ``self`` is the run's policy, estimator or model (or one of the model's layers), or when
its code lives in the plugin's package (an estimator's hook functions, a policy's helpers). The
innermost policy or estimator frame wins (an estimator hook that fails inside the model's forward
is the estimator's fault), else the outermost model frame; the call named is the first method of
that plugin the loop entered.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any

#: Modules whose frames are dbx calling a plugin, not a plugin running.
CALLERS = ("dbx.train.", "dbx.runner")
#: torch's own frames for ``model(x)``: the call a user knows is ``forward``.
MODULE_CALLS = {"_wrapped_call_impl", "_call_impl"}


@dataclass
class PluginCall:
    kind: str
    name: str
    distribution: str
    version: str
    call: str

    @property
    def plugin(self) -> str:
        return f"{self.kind} {self.name!r} ({self.distribution} {self.version})"

    def describe(self) -> str:
        return f"{self.plugin} raised in {self.call}"


def plugin_call(exc: BaseException, spec: Any, parts: Any) -> PluginCall | None:
    """The plugin call in which ``exc`` was raised during training, or None (dbx's own code, torch)."""
    frames = _frames_below_callers(exc.__traceback__)
    owners = [_owner(frame, parts) for frame in frames]
    chosen = next((i for i in reversed(range(len(frames))) if owners[i] in ("policy", "estimator")), None)
    if chosen is None:
        chosen = next((i for i, owner in enumerate(owners) if owner == "model"), None)
    if chosen is None:
        return None
    kind = owners[chosen]
    entered = chosen
    while entered > 0 and owners[entered - 1] == kind:
        entered -= 1
    call = frames[entered].f_code.co_name
    if kind == "model" and call in MODULE_CALLS:
        call = "forward"
    from dbx import registry

    section = {"policy": spec.policy, "estimator": spec.estimator, "model": spec.model}[kind]
    try:
        info = registry.info(kind, section.name)
    except Exception:  # noqa: BLE001 - naming the plugin must never hide the failure itself
        return PluginCall(kind, section.name, "?", "?", call)
    return PluginCall(kind, section.name, info.distribution, info.version, call)


def _frames_below_callers(tb: TracebackType | None) -> list[Any]:
    """The traceback's frames from the first one that dbx's loop called (outermost first)."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    modules = [frame.f_globals.get("__name__", "") for frame in frames]
    for index in range(len(frames) - 1):
        if modules[index].startswith(CALLERS) and not modules[index + 1].startswith(CALLERS):
            return frames[index + 1:]
    return []


def _owner(frame: Any, parts: Any) -> str | None:
    from dbx.train.drift import RecordedPolicy

    policy = parts.policy.policy if isinstance(parts.policy, RecordedPolicy) else parts.policy
    this = frame.f_locals.get("self")
    if this is not None:
        if this is policy:
            return "policy"
        if parts.estimator is not None and this is parts.estimator:
            return "estimator"
        if this is parts.model or any(this is layer for layer in parts.model.modules()):
            return "model"
    module = frame.f_globals.get("__name__", "")
    for kind, obj in (("policy", policy), ("estimator", parts.estimator)):
        if obj is not None and _in_package(module, type(obj).__module__):
            return kind
    if _in_package(module, type(parts.model).__module__):
        return "model"
    return None


def _in_package(module: str, plugin_module: str) -> bool:
    """``module`` is the plugin's module or a sibling in its package (``dbx.estimators.hooks`` for
    ``dbx.estimators.exact``); a top-level plugin module is its own package."""
    if plugin_module.split(".")[0] in ("torch", "builtins"):
        return False  # e.g. a model that is a plain nn.Sequential: only its layers' frames are its own
    package = plugin_module.rpartition(".")[0] or plugin_module
    return module == plugin_module or module.startswith(package + ".") or module == package

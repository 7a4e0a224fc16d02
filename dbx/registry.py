"""Find plugins through entry points, load them lazily, and check their parameters.

Entry points are the only discovery path: dbx's built-ins are declared in its own setup.cfg
under the same groups a third-party package uses, so a plugin from elsewhere is a peer of a
built-in. Listing reads metadata only; a plugin's module is imported when a spec names it.
"""
from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any, Callable

from dbx.errors import UserError

GROUPS: dict[str, str] = {
    "policy": "dbx.policies",
    "estimator": "dbx.estimators",
    "model": "dbx.models",
    "dataset": "dbx.datasets",
}

#: Keywords dbx passes to factories itself (when their signature accepts them); not spec params.
INJECTED: dict[str, tuple[str, ...]] = {
    "policy": ("dataset_size", "seed"),
    "estimator": ("seed",),
    "model": ("num_classes", "input_shape"),
    "dataset": ("root", "seed"),
}


class PluginError(UserError):
    """A plugin cannot be found, loaded or configured."""


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    target: str
    distribution: str
    version: str

    def describe(self) -> str:
        return f"{self.group}:{self.name} = {self.target} (from {self.distribution} {self.version})"

    @property
    def group(self) -> str:
        return GROUPS[self.kind]


def _check_kind(kind: str) -> str:
    if kind not in GROUPS:
        raise ValueError(f"unknown plugin kind {kind!r}; expected one of {sorted(GROUPS)}")
    return GROUPS[kind]


@lru_cache(maxsize=None)
def _scan(group: str) -> tuple[dict[str, PluginInfo], tuple[str, ...]]:
    """All entry points of a group, and a message per name that two distributions claim."""
    kind = next(k for k, g in GROUPS.items() if g == group)
    found: dict[str, PluginInfo] = {}
    conflicts: dict[str, set[PluginInfo]] = {}
    for dist in metadata.distributions():
        dist_name = dist.metadata["Name"] or "?"
        for ep in dist.entry_points:
            if ep.group != group:
                continue
            info = PluginInfo(kind, ep.name, ep.value, dist_name, dist.version)
            seen = found.get(ep.name)
            if seen is None:
                found[ep.name] = info
            elif _canonical(seen.distribution) != _canonical(dist_name):
                conflicts.setdefault(ep.name, {seen}).add(info)
            # the same distribution seen twice (e.g. an editable install) is not a conflict
    messages = tuple(
        f"plugin name {name!r} in group {group} is registered by "
        + " and by ".join(f"{i.distribution} {i.version} ({i.target})" for i in sorted(infos, key=lambda i: i.distribution))
        + "; uninstall one of them (pip uninstall ...) or rename its entry point"
        for name, infos in sorted(conflicts.items())
    )
    return found, messages


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def refresh() -> None:
    """Forget what was discovered (after installing a plugin package in the same process)."""
    _scan.cache_clear()
    load.cache_clear()


def available(kind: str) -> dict[str, PluginInfo]:
    """Every plugin registered for ``kind``, by name (see ``conflicts`` for names claimed twice).

    A name that two distributions register is an error when a spec uses it (``info``), not
    before: one clash does not block every other plugin of the group.
    """
    found, _ = _scan(_check_kind(kind))
    return dict(sorted(found.items()))


def conflicts(kind: str) -> tuple[str, ...]:
    """Messages for names that two distributions register (empty when there are none)."""
    return _scan(_check_kind(kind))[1]


def info(kind: str, name: str) -> PluginInfo:
    """The entry point of one plugin, or an error listing what exists, with a did-you-mean."""
    plugins = available(kind)
    clashes = [m for m in conflicts(kind) if m.startswith(f"plugin name {name!r} ")]
    if clashes:
        raise PluginError(clashes[0])
    if name in plugins:
        return plugins[name]
    guess = difflib.get_close_matches(name, list(plugins), n=1)
    hint = f" Did you mean {guess[0]!r}?" if guess else ""
    listing = ", ".join(f"{n} ({i.distribution})" for n, i in plugins.items()) or "none"
    raise PluginError(
        f"unknown {kind} {name!r}.{hint} Available {kind} plugins: {listing}. "
        f"A third-party {kind} must be pip-installed and register an entry point in group {GROUPS[kind]}."
    )


@lru_cache(maxsize=None)
def load(kind: str, name: str) -> Callable[..., Any]:
    """Import a plugin's factory. A plugin that fails to import is a hard error, never a warning."""
    entry = info(kind, name)
    module_name, _, attr = entry.target.partition(":")
    try:
        factory: Any = __import__(module_name, fromlist=["_"])
        for part in attr.split(".") if attr else []:
            factory = getattr(factory, part)
    except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
        raise PluginError(
            f"{kind} plugin {name!r} (group {entry.group}, target {entry.target}, from "
            f"{entry.distribution} {entry.version}) failed to load: {type(exc).__name__}: {exc}. "
            f"Reinstall or fix that package, or choose another {kind}."
        ) from exc
    if not callable(factory):
        raise PluginError(f"{kind} plugin {name!r} ({entry.target}) is not callable")
    return factory


@dataclass(frozen=True)
class Param:
    name: str
    annotation: Any
    default: Any
    required: bool


def params_of(kind: str, factory: Callable[..., Any]) -> tuple[dict[str, Param], bool]:
    """The user-settable parameters of a factory, and whether it also takes ``**kwargs``.

    Keyword-only parameters (and, for plain functions, ordinary ones) form the schema; the ones
    dbx injects are left out.
    """
    target = factory.__init__ if inspect.isclass(factory) else factory
    sig = inspect.signature(factory)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolved hints just mean no type checking
        hints = {}
    params: dict[str, Param] = {}
    var_kw = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
            continue
        if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY) or p.name in INJECTED[kind]:
            continue
        required = p.default is inspect.Parameter.empty
        params[p.name] = Param(p.name, hints.get(p.name, Any), None if required else p.default, required)
    return params, var_kw


def signature_problems(kind: str, factory: Any) -> list[str]:
    """What keeps ``factory``'s signature from serving as dbx's parameter schema (empty when fine).

    dbx passes params by keyword and checks each value against its type hint before a run, so
    every parameter must be keyword-only (a bare ``*`` before them), have a type hint, and a
    default that satisfies it; ``*args`` cannot receive anything. ``dbx.testing``'s checks,
    ``dbx validate`` and ``dbx plugins --check`` all report these.
    """
    if not callable(factory):
        return [f"the entry point must name a class or function, got {type(factory).__name__}"]
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError) as exc:
        return [f"its signature cannot be read ({exc}); dbx needs it as the parameter schema"]
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception as exc:  # noqa: BLE001 - whatever breaks the hints, the author must fix it
        return [f"its type hints cannot be resolved ({type(exc).__name__}: {exc}); dbx could not check "
                f"params against them (import every name a hint uses, outside TYPE_CHECKING)"]
    problems = []
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            continue
        if p.kind is p.VAR_POSITIONAL:
            problems.append(f"it takes *{p.name}; dbx passes keywords only: remove it")
            continue
        if p.kind is not p.KEYWORD_ONLY:
            problems.append(f"parameter {p.name!r} is not keyword-only; put a bare * before the parameters "
                            f"(def __init__(self, *, {p.name}...)) so the signature is the schema")
        if p.name in INJECTED[kind]:
            continue
        if p.name not in hints:
            problems.append(f"parameter {p.name!r} has no type hint; dbx validates spec params against the "
                            f"hints (e.g. {p.name}: int = ...)")
            continue
        if p.default is not inspect.Parameter.empty:
            error = type_error(hints[p.name], p.default)
            if error:
                problems.append(f"the default of {p.name!r} ({p.default!r}) does not match its type hint: {error}")
    return problems


def type_error(annotation: Any, value: Any) -> str | None:
    """How ``value`` fails ``annotation`` under the rules ``dbx validate`` applies, or None."""
    if annotation is Any:
        return None
    from pydantic import TypeAdapter, ValidationError

    try:
        TypeAdapter(annotation).validate_python(value, strict=_strict_for(annotation, value))
    except ValidationError as exc:
        return exc.errors()[0]["msg"]
    except Exception:  # noqa: BLE001 - a hint pydantic cannot handle is accepted as-is
        return None
    return None


def check_params(kind: str, name: str, params: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """Problems with ``params`` for plugin ``name``, as (key path inside params, message) pairs."""
    from pydantic import TypeAdapter, ValidationError  # light, and only needed here

    factory = load(kind, name)
    schema, var_kw = params_of(kind, factory)
    problems: list[tuple[tuple[str, ...], str]] = []
    for key, value in params.items():
        if key in INJECTED[kind]:
            problems.append(((key,), f"{key!r} is set by dbx for every {kind}; remove it from params"))
            continue
        if key not in schema:
            if var_kw:
                continue
            guess = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" Did you mean {guess[0]!r}?" if guess else ""
            valid = ", ".join(schema) or "none"
            problems.append(((key,), f"unknown parameter {key!r} for {kind} {name!r}.{hint} Valid parameters: {valid}"))
            continue
        annotation = schema[key].annotation
        if annotation is Any or annotation is inspect.Parameter.empty:
            continue
        try:
            TypeAdapter(annotation).validate_python(value, strict=_strict_for(annotation, value))
        except ValidationError as exc:
            first = exc.errors()[0]
            expects = "" if typing.get_origin(annotation) is typing.Literal else f"; {name} expects {_type_name(annotation)}"
            problems.append(((key,), f"{first['msg']} (got {_shown(value)}{expects})"))
        except Exception:  # noqa: BLE001 - an annotation pydantic cannot handle is not the user's fault
            continue
    for key, param in schema.items():
        if param.required and key not in params:
            problems.append(((key,), f"missing required parameter {key!r} for {kind} {name!r}"))
    return problems


def _shown(value: Any, width: int = 60) -> str:
    """``repr(value)``, cut to ``width`` characters: a message is one line, whatever the value."""
    import reprlib

    short = reprlib.Repr()
    short.maxlist = short.maxdict = short.maxtuple = short.maxset = 4
    short.maxstring = short.maxother = width
    short.maxlevel = 2
    shortened = short.repr(value)
    return shortened if len(shortened) <= width else shortened[: width - 3] + "..."


def _strict_for(annotation: Any, value: Any) -> bool:
    # Strict mode rejects "3" for int and 3.5 for int; but ints are fine where floats are expected.
    return not isinstance(value, int)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def build(kind: str, name: str, params: dict[str, Any], **injected: Any) -> Any:
    """Construct a plugin: its spec params plus whichever injected keywords it accepts."""
    factory = load(kind, name)
    sig = inspect.signature(factory)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    extra = {k: v for k, v in injected.items() if takes_any or k in sig.parameters}
    try:
        return factory(**params, **extra)
    except UserError:
        raise
    except (TypeError, ValueError) as exc:
        entry = info(kind, name)
        raise PluginError(f"{kind} {name!r} (from {entry.distribution} {entry.version}) rejected its parameters "
                          f"{_shown(params, 120)}: {exc}") from exc

"""Checks that need the plugin registry: plugin names and their params, and the plugin listing.

Kept apart from ``dbx.spec`` (which never imports a plugin) so that the schema can be checked
without importing anything heavy, and these checks can report against the spec's lines.
"""
from __future__ import annotations

from typing import Any, Callable, Collection, Sequence

from dbx import registry
from dbx.errors import UserError
from dbx.spec import Problem, Spec, SpecError, expand_sweep, load_spec

#: Spec section -> plugin kind.
SECTIONS = {"data": "dataset", "model": "model", "policy": "policy", "estimator": "estimator"}


def plugin_problems(spec: Spec) -> list[Problem]:
    """Every unknown plugin name and every param its factory's signature does not accept."""
    return _plugin_problems(spec.to_dict(), spec.where)


def _plugin_problems(data: dict[str, Any], where: Callable[[tuple[str, ...]], str],
                     poisoned: Collection[tuple[str, ...]] = ()) -> list[Problem]:
    """The same checks on a spec as read, so they also run when the schema has other problems.

    A param that holds a value the reader could not read (``poisoned``: already reported) is
    not checked again."""
    problems: list[Problem] = []
    for section, kind in SECTIONS.items():
        ref = data.get(section)
        if section == "estimator" and ref is None:
            ref = {"name": "exact"}
        if not isinstance(ref, dict) or not isinstance(ref.get("name"), str):
            continue  # the schema check reports a missing or malformed section
        params = ref.get("params") or {}
        if isinstance(params, dict) and poisoned:
            params = {k: v for k, v in params.items()
                      if not any(p[:3] == (section, "params", k) for p in poisoned)}
        try:
            registry.info(kind, ref["name"])
            found = registry.check_params(kind, ref["name"], dict(params)) if isinstance(params, dict) else []
        except UserError as exc:
            problems.append(Problem(where((section, "name")), f"{section}.name", str(exc)))
            continue
        for path, message in found:
            key = (section, "params", *path)
            problems.append(Problem(where(key), ".".join(key), message))
    return problems


def signature_warnings(spec: Spec) -> list[Problem]:
    """One warning per plugin the spec (or any point of its sweep) uses whose signature cannot
    serve as its parameter schema: its params then reach it unchecked (``registry.signature_problems``)."""
    warnings: dict[tuple[str, str], Problem] = {}
    for _, point in expand_sweep(spec):
        for section, kind in SECTIONS.items():
            name = getattr(point, section).name
            if (kind, name) in warnings:
                continue
            found = registry.signature_problems(kind, registry.load(kind, name))
            if found:
                info = registry.info(kind, name)
                message = (f"warning: {kind} {name!r} (from {info.distribution} {info.version}) has a signature dbx "
                           f"cannot check params against: {'; '.join(found)}. Its params reach it unchecked; tell "
                           f"its authors (dbx.testing.check_{kind} reports the same)")
                warnings[(kind, name)] = Problem(spec.where((section, "name")), f"{section}.name", message)
    return list(warnings.values())


def check_spec_file(path: str, overrides: Sequence[str] = (), *,
                    warn: Callable[[str], None] | None = None) -> Spec:
    """Load, validate and plugin-check a spec; raise one SpecError listing every problem.

    ``warn`` receives each of ``signature_warnings`` (plugins whose params cannot be checked)."""
    try:
        spec = load_spec(path, overrides)
    except SpecError as exc:
        if isinstance(exc.data, dict):
            extra = [p for p in _plugin_problems(exc.data, exc.where, exc.poisoned) if p not in exc.problems]
            if extra:
                raise SpecError(_in_file_order(exc.problems + extra)) from None
        raise
    problems = plugin_problems(spec)
    if spec.sweep:
        problems += _sweep_problems(spec)
    if problems:
        raise SpecError(_in_file_order(_unique(problems)))
    if warn is not None:
        for warning in signature_warnings(spec):
            warn(str(warning))
    return spec


def _sweep_problems(spec: Spec) -> list[Problem]:
    """Each point of the grid must be valid too: values in range, plugin names and params."""
    problems: list[Problem] = []
    for key, values in spec.sweep.items():  # one key at a time, so one bad key hides no other
        single = spec.model_copy(update={"sweep": {key: values}})
        try:
            points = expand_sweep(single)
        except SpecError as exc:
            problems += exc.problems
            continue
        for label, point in points:
            for problem in plugin_problems(point):
                problems.append(Problem(problem.where, problem.key, f"{problem.message} (sweep point {label})"))
    if not problems and len(spec.sweep) > 1:  # each key is fine alone: check the combinations
        for label, point in expand_sweep(spec):
            for problem in plugin_problems(point):
                problems.append(Problem(problem.where, problem.key, f"{problem.message} (sweep point {label})"))
    return problems


def _unique(problems: list[Problem]) -> list[Problem]:
    """The same problem found in many sweep points is reported once."""
    seen: dict[tuple[str, str], Problem] = {}
    for problem in problems:
        seen.setdefault((problem.where, problem.key), problem)
    return list(seen.values())


def _in_file_order(problems: list[Problem]) -> list[Problem]:
    def line(problem: Problem) -> int:
        tail = problem.where.rsplit(":", 1)[-1]
        return int(tail) if tail.isdigit() else 10**9

    return sorted(problems, key=line)


def plugin_table(*, check: bool, echo: Callable[[str], None]) -> int:
    """Print each group's plugins; with ``check``, import each and report every failure. Exit code.

    Failure messages are printed in full under their group's table (a table cell would wrap them
    out of shape); the table's status column refers to them by number.
    """
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width))
    failures = 0
    for kind, group in registry.GROUPS.items():
        table = Table(title=f"{group}  (spec: {kind if kind != 'dataset' else 'data'}.name)", title_justify="left")
        for column in ("name", "provided by", "version", "target") + (("status",) if check else ()):
            table.add_column(column)
        conflicts = registry.conflicts(kind)
        for message in conflicts:
            failures += 1
            echo(f"error: {message}")
        clashing = {m.split("'")[1] for m in conflicts}
        messages: list[str] = []
        for name, info in registry.available(kind).items():
            row = [name, info.distribution, info.version, info.target]
            if check and name in clashing:  # unusable until one of the distributions goes
                row.append("blocked (name conflict)")
            elif check:
                problem = _load_problem(kind, name)
                if problem:
                    messages.append(problem)
                row.append(f"FAILED [{failures + len(messages)}]" if problem else "ok")
            table.add_row(*row)
        console.print(table)
        for message in messages:
            failures += 1
            echo(f"[{failures}] error: {message}")
    if check:
        echo(f"{failures} problem(s)" if failures else "all plugins load")
    return 1 if failures else 0


def _load_problem(kind: str, name: str) -> str | None:
    """Why the plugin cannot be used as dbx uses it: it fails to import, or its signature cannot
    serve as its parameter schema."""
    try:
        factory = registry.load(kind, name)
    except UserError as exc:
        return str(exc)
    found = registry.signature_problems(kind, factory)
    if found:
        info = registry.info(kind, name)
        return (f"{kind} plugin {name!r} (group {info.group}, target {info.target}, from {info.distribution} "
                f"{info.version}) has a signature dbx cannot check spec params against: {'; '.join(found)}")
    return None


def describe_plugins(spec: Spec) -> dict[str, Any]:
    """Tag values naming the distribution and version behind each plugin a run uses."""
    out = {}
    for section, kind in SECTIONS.items():
        info = registry.info(kind, getattr(spec, section).name)
        out[kind] = f"{info.name} ({info.distribution} {info.version})"
    return out

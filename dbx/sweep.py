"""A sweep: every point of a spec's ``sweep:`` grid, trained one after the other under one parent run.

    dbx run experiments/synthetic/sweep.yaml         # 4 policies x 5 seeds = 20 nested runs

The parent MLflow run is named after the spec and holds its params and files; each point is a
child run (``mlflow.parentRunId``) named after the values it varies, e.g. ``divebatch-seed0``, so
the MLflow UI shows the grid as a tree. A point that fails, because training diverged or because
its own values are wrong (e.g. a plugin parameter that only one value of the grid breaks), is
marked FAILED and the sweep goes on; the exit code (1) then says that something failed. At the
end the points are compared (``dbx compare``'s table and plots), and the comparison is attached to
the parent run.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from dbx.errors import RunFailed, UserError

Say = Callable[[str], None]


@dataclass
class PointOutcome:
    name: str
    label: str
    status: str  # FINISHED | FAILED | KILLED
    run_id: str | None = None
    message: str = ""


def run_sweep(spec: Any, *, uri: str, experiment: str | None = None, say: Say = print) -> int:
    """Train each point of ``spec.sweep`` as a nested run; return 0, or 1 if any point failed
    (130 when interrupted: the remaining points are not started)."""
    from dbx import stopping, tracking
    from dbx.spec import expand_sweep
    from dbx.store import check_store

    points = expand_sweep(spec)  # a wrong grid is a SpecError (exit 2) before anything starts
    names = point_names(spec)
    check_store(uri)
    labels = dict(zip(names, (label for label, _ in points), strict=True))
    parent = tracking.open_sweep_run(spec, uri=uri, experiment=experiment, points=labels)
    say(f"sweep {spec.name} ({parent.run_id}): {len(points)} runs, one after the other")
    outcomes: list[PointOutcome] = []
    try:
        for index, ((label, point), name) in enumerate(zip(points, names, strict=True), 1):
            stopping.raise_if_stopped()
            say(f"\n[{index}/{len(points)}] {name}  ({label})")
            outcomes.append(_run_point(point, name, label, uri=uri, experiment=experiment,
                                       parent_run_id=parent.run_id, say=say))
            if outcomes[-1].status == "KILLED":
                break
    except KeyboardInterrupt:  # between two points
        stopping.handled()
        outcomes.append(PointOutcome("(between runs)", "", "KILLED"))
    except BaseException:  # a bug in dbx itself: the parent must not stay RUNNING
        with stopping.closing():
            parent.finish("FAILED", failure={"reason": "exception", "message": "the sweep itself crashed"})
        raise

    interrupted = any(o.status == "KILLED" for o in outcomes)
    failed = [o for o in outcomes if o.status == "FAILED"]
    say("\n" + sweep_summary(outcomes, len(points)))
    with stopping.closing():
        parent.log_text(json.dumps([o.__dict__ for o in outcomes], indent=2), "sweep/points.json")
        if any(o.status == "FINISHED" for o in outcomes) and not interrupted:
            _compare_into(parent, uri, say)
        status = "KILLED" if interrupted else ("FAILED" if failed else "FINISHED")
        parent.finish(status, failure={"reason": "points_failed",
                                       "message": f"{len(failed)} of {len(points)} runs failed"} if failed else None)
    say(f"browse with: dbx ui --tracking-uri {uri}   compare with: dbx compare --parent {parent.run_id} "
        f"--tracking-uri {uri}")
    if interrupted:
        return 130
    return 1 if failed else 0


def _run_point(point: Any, name: str, label: str, *, uri: str, experiment: str | None, parent_run_id: str,
               say: Say) -> PointOutcome:
    """Train one point; whatever goes wrong in it is its outcome, never the end of the sweep."""
    from dbx import tracking
    from dbx.runner import run_one

    outcome = PointOutcome(name, label, "FAILED")
    try:
        problems = _plugin_problems(point)
        if problems:
            raise UserError(problems)
        result = run_one(point, uri=uri, experiment=experiment, say=say, parent_run_id=parent_run_id, run_name=name)
        outcome.run_id = result.run_id
        outcome.status = {0: "FINISHED", 130: "KILLED"}.get(result.exit_code, "FAILED")
        return outcome
    except KeyboardInterrupt:
        outcome.status = "KILLED"
        return outcome
    except RunFailed as exc:  # training failed: run_one has marked the run FAILED with the reason
        outcome.message = str(exc)
        say(f"run failed: {exc}")
        return outcome
    except UserError as exc:  # this point's values are wrong; nothing was trained for it
        outcome.message, reason = str(exc), "input"
        say(f"error in this point: {exc}")
    except Exception as exc:  # noqa: BLE001 - e.g. a plugin that crashes while being built
        outcome.message, reason = f"{type(exc).__name__}: {exc}", "exception"
        say(f"error in this point: {outcome.message}")
    outcome.run_id = tracking.record_failed_point(point, uri=uri, experiment=experiment, run_name=name,
                                                  parent_run_id=parent_run_id, message=outcome.message,
                                                  reason=reason)
    return outcome


def describe_points(spec: Any, say: Say) -> int:
    """What ``dbx run`` would train, one line per run, without starting anything."""
    from dbx.spec import expand_sweep

    points = expand_sweep(spec)
    names = point_names(spec) if spec.sweep else [f"{spec.name}-seed{spec.seed}"]
    for index, ((label, point), name) in enumerate(zip(points, names, strict=True), 1):
        say(f"{index:>3}. {name}  {label or '(single run)'}  policy={point.policy.name} epochs={point.epochs}")
    say(f"{len(points)} run(s); nothing was started (--dry-run)")
    return 0


def sweep_summary(outcomes: list[PointOutcome], total: int) -> str:
    """One line per point and a count, e.g. ``FAILED  divebatch-seed3  training diverged ...``."""
    lines = [f"sweep: {sum(o.status == 'FINISHED' for o in outcomes)} of {total} runs finished"]
    for o in outcomes:
        first_line = o.message.splitlines()[0] if o.message else ""
        lines.append(f"  {o.status:<8} {o.name}  {first_line}".rstrip())
    if len(outcomes) < total:
        lines.append(f"  ({total - len(outcomes)} not started)")
    return "\n".join(lines)


def _plugin_problems(point: Any) -> str:
    """The plugin-parameter problems of one point (the base spec's plugins were checked already)."""
    from dbx.checks import plugin_problems

    return "\n".join(str(p) for p in plugin_problems(point))


def _compare_into(parent: Any, uri: str, say: Say) -> None:
    """Print the comparison of the finished points and attach it (table and plots) to the parent."""
    from dbx import report

    try:
        comparison = report.load_comparison(uri, parent=parent.run_id)
    except UserError as exc:  # e.g. a regression task: nothing to compare by accuracy
        say(f"(no comparison: {exc})")
        return
    say(report.render(comparison, "table"))
    report.attach(comparison, uri, parent.run_id)
    say("comparison attached to the parent run: comparison/comparison.md, comparison/curves.png")


# --------------------------------------------------------------------------------------------
# Run names from the varied keys
# --------------------------------------------------------------------------------------------


def point_names(spec: Any) -> list[str]:
    """A readable, unique run name per point of the grid, in ``expand_sweep`` order.

    Each varied key gives one token: ``policy.name: divebatch`` -> ``divebatch``,
    ``optimizer.lr: 0.1`` -> ``lr0.1``, a whole plugin block ``policy: {name: fixed, params:
    {batch_size: 32}}`` -> ``fixed-batch_size32`` (its params only where they tell same-named values
    apart), ``seed: 3`` -> ``seed3``, always last. A joint key (``policy+lr_scaling``) joins
    the tokens of its parts: the first always, each other one where its value is not the spec's
    own (``lr_scaling: none`` in a spec that says none adds nothing): ``divebatch`` and
    ``divebatch-lr_scalinglinear``. A grid
    that varies only the seed keeps the spec's name: ``quickstart-seed3``. The name without its
    ``-seedN`` is the point's group in ``dbx compare``.
    """
    import itertools

    sweep = spec.sweep or {}
    keys = [k for k in sweep if k != "seed"]
    tokens_per_key = [_tokens(spec, key, sweep[key]) for key in keys]
    seeds = sweep.get("seed")
    names: list[str] = []
    for combo in itertools.product(*(range(len(sweep[k])) for k in sweep)):
        chosen = dict(zip(sweep, combo, strict=True))
        parts = [tokens_per_key[i][chosen[key]] for i, key in enumerate(keys)]
        parts = [p for p in parts if p] or [spec.name]
        seed = seeds[chosen["seed"]] if seeds is not None else spec.seed
        names.append("-".join(parts + [f"seed{seed}"]))
    seen: dict[str, int] = {}
    unique = []
    for name in names:  # values that read the same (e.g. 0.1 and "0.1") still get distinct names
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def _tokens(spec: Any, key: str, values: list[Any]) -> list[str]:
    """The name token of each value of one sweep key (see ``point_names``)."""
    from dbx.spec import sweep_key_paths

    paths = sweep_key_paths(key)
    if len(paths) == 1:
        return [_token(key, value, values) for value in values]
    base = spec.to_dict()
    columns = [[v[i] for v in values] for i in range(len(paths))]
    own = [_token(".".join(path), _value_at(base, path), column) for path, column in zip(paths, columns)]
    tokens = []
    for value in values:
        parts = [_token(".".join(path), part, column) for path, part, column in zip(paths, value, columns)]
        tokens.append("-".join(p for i, p in enumerate(parts) if p and (i == 0 or p != own[i])))
    return tokens


def _value_at(data: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _token(key: str, value: Any, all_values: list[Any]) -> str:
    last = key.split(".")[-1]
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        same_name = [v for v in all_values if isinstance(v, dict) and v.get("name") == value["name"]]
        params = value.get("params") or {}
        differing = [p for p in sorted(params)
                     if any((v.get("params") or {}).get(p) != params[p] for v in same_name)]
        return _clean("-".join([value["name"], *(f"{p}{_short(params[p])}" for p in differing)]))
    if isinstance(value, str) and last == "name":
        return _clean(value)
    return _clean(f"{last}{_short(value)}")


def _short(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,:=+-]+", "_", text).strip("_")

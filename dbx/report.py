"""Comparing runs: did a policy reach a good accuracy sooner? The numbers behind ``dbx compare``.

Runs are grouped (by default by their name without ``-seedN``: a sweep point's varied values,
e.g. ``divebatch``); seeds of one group are repeats. Per group, over its seeds, mean and standard
error of:

- the final test accuracy (last epoch) and the best;
- the paper's metric (docs/algorithm.md, "Measuring faster"): the accuracy is averaged over seeds
  per epoch; "epochs to +-1%" is the first epoch whose mean accuracy reaches the group's *own*
  final accuracy minus 1 point, and "seconds to +-1%" sums the mean training time per epoch
  (``epoch_seconds``: evaluation excluded) up to and including that epoch. The standard error of
  the seconds is that of each seed's training time up to that epoch. A group that plateaus low
  counts as fast by this metric;
- the fairer metric: epochs and seconds until each seed first reaches one *common* target accuracy
  (default: the baseline group's final accuracy minus 1 point), with training time only and with
  evaluation time included. A seed that never reaches it is not counted as zero: the group shows
  "not reached", or how many of its seeds reached it;
- speedups against the baseline group: baseline seconds / group seconds, for both metrics.

The metric is the test accuracy by default, or ``test_perplexity`` / ``test_loss`` (lower is
better) for language models (``--metric``; ``auto`` picks perplexity when every run logged it).
For those, "+-1%" is within 1% of the group's own final value (``final * 1.01``), and the default
common target is the baseline's final value times 1.01.

Nothing here trains anything or talks to MLflow directly: ``dbx.tracking`` reads the runs.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from dbx.errors import UserError

ONE_POINT = 0.01  # accuracies are fractions; "1 point" is one percentage point
_SEED_SUFFIX = re.compile(r"-seed\d+(-\d+)?$")
FORMATS = ("table", "markdown", "csv", "json")


# --------------------------------------------------------------------------------------------
# Plain records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """The per-epoch test metric runs are compared by, and what reaching a mark of it means."""

    key: str  # the MLflow metric
    label: str  # for column headings
    higher_is_better: bool
    percent: bool = False  # shown times 100 (accuracy)

    def reaches(self, value: float, threshold: float) -> bool:
        """At or past ``threshold`` in the good direction (1e-12 of slack for rounding)."""
        if self.higher_is_better:
            return value >= threshold - 1e-12
        return value <= threshold + 1e-12

    def near(self, final: float) -> float:
        """The "+-1%" mark of a final value: 1 point below an accuracy, 1% above a perplexity or loss."""
        return final - ONE_POINT if self.higher_is_better else final * (1.0 + ONE_POINT)

    def best(self, values: Sequence[float]) -> float:
        return max(values) if self.higher_is_better else min(values)

    def show(self, value: float) -> str:
        return f"{value * 100:.2f}%" if self.percent else f"{value:.4g}"

    @property
    def near_words(self) -> str:
        return "final accuracy minus 1 point" if self.higher_is_better else f"final {self.label} plus 1%"


METRICS = {
    "test_accuracy": Metric("test_accuracy", "acc %", True, percent=True),
    "test_perplexity": Metric("test_perplexity", "ppl", False),
    "test_loss": Metric("test_loss", "loss", False),
}


@dataclass
class RunCurves:
    """One run's per-epoch numbers, aligned on ``epochs`` (1, 2, ...); ``score`` is the compared
    metric (the test accuracy unless the comparison says otherwise)."""

    name: str
    group: str
    epochs: list[int]
    score: list[float]
    epoch_seconds: list[float]  # training only
    eval_seconds: list[float]
    wall_seconds: list[float] = field(default_factory=list)
    batch_size: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    samples_seen: list[float] = field(default_factory=list)
    noise_scale: list[float] = field(default_factory=list)  # m * diversity - 1 in measuring epochs, else NaN
    train_size: int | None = None  # n, the run's dbx.train_size
    world_size: int | None = None


def noise_scales(diversity: Sequence[float], samples: Sequence[float]) -> list[float]:
    """The gradient noise scale B_simple ~ m * diversity - 1 (McCandlish et al. 2018), per epoch,
    from the diversity measured over m samples (NaN where nothing was measured): the batch size
    beyond which a larger batch stops paying for itself, to compare with the batch size used."""
    return [m * d - 1.0 if not (math.isnan(m) or math.isnan(d)) and m > 0 else math.nan
            for d, m in zip(diversity, samples, strict=True)]


@dataclass
class Estimate:
    """A mean over seeds with its standard error (None for a single seed)."""

    mean: float | None
    se: float | None = None
    n: int = 0  # seeds that contributed
    of: int = 0  # seeds in the group

    @property
    def reached(self) -> bool:
        return self.mean is not None


@dataclass
class GroupCurves:
    """Seed-averaged curves of one group, for the plots: per epoch, mean and standard error.
    ``measured`` holds the series that exist in some epochs only (the noise scale of measuring
    epochs): metric -> (epochs, mean, se)."""

    label: str
    epochs: list[int]
    series: dict[str, tuple[list[float], list[float]]]  # metric -> (mean, se)
    measured: dict[str, tuple[list[int], list[float], list[float]]] = field(default_factory=dict)


@dataclass
class GroupResult:
    group: str
    runs: list[str]
    final_accuracy: Estimate
    best_accuracy: Estimate
    epochs_to_own: int | None  # the paper's metric, on the seed-averaged curve
    seconds_to_own: Estimate
    epochs_to_target: Estimate
    seconds_to_target: Estimate
    seconds_to_target_with_eval: Estimate
    speedup_own: float | None = None
    speedup_target: float | None = None
    curves: GroupCurves | None = None


@dataclass
class Comparison:
    what: str  # which runs, in words
    baseline: str
    target: float
    target_source: str  # "--target" or "baseline final - 1 point"
    groups: list[GroupResult]
    skipped: list[str] = field(default_factory=list)  # runs left out, with why
    parents: list[str] = field(default_factory=list)  # the sweep parent runs of the compared runs
    metric: Metric = field(default_factory=lambda: METRICS["test_accuracy"])
    train_sizes: dict[str, list[int]] = field(default_factory=dict)  # group -> the n of its runs


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def mean_se(values: Sequence[float], of: int | None = None) -> Estimate:
    """Mean and standard error (sample standard deviation / sqrt(n)) of ``values``."""
    n = len(values)
    of = n if of is None else of
    if n == 0:
        return Estimate(None, None, 0, of)
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, None, 1, of)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(variance / n), n, of)


def mean_curve(runs: Sequence[RunCurves], metric: str) -> tuple[list[int], list[float], list[float]]:
    """Per epoch, mean and standard error over the runs that have that epoch."""
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        values = getattr(run, metric)
        if not values:
            continue  # not logged by this run
        for epoch, value in zip(run.epochs, values, strict=True):
            if value is not None and not math.isnan(value):
                by_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(by_epoch)
    estimates = [mean_se(by_epoch[e]) for e in epochs]
    return epochs, [e.mean for e in estimates], [e.se or 0.0 for e in estimates]


def first_epoch_reaching(epochs: Sequence[int], values: Sequence[float], threshold: float,
                         metric: Metric | None = None) -> int | None:
    """The first epoch whose value reaches ``threshold`` (at least it, for an accuracy)."""
    metric = metric or METRICS["test_accuracy"]
    for epoch, value in zip(epochs, values, strict=True):
        if metric.reaches(value, threshold):
            return epoch
    return None


def seconds_until(run: RunCurves, epoch: int, *, with_eval: bool = False) -> float:
    """The run's training time (plus evaluation time) summed over epochs 1..``epoch``."""
    total = 0.0
    for e, train, evaluation in zip(run.epochs, run.epoch_seconds, run.eval_seconds, strict=True):
        if e > epoch:
            break
        total += train + (evaluation if with_eval else 0.0)
    return total


def summarize_group(group: str, runs: Sequence[RunCurves], target: float, metric: Metric | None = None) -> GroupResult:
    """Every number of one group's row (speedups are filled in by ``compare``)."""
    metric = metric or METRICS["test_accuracy"]
    of = len(runs)
    finals = [r.score[-1] for r in runs]
    final = mean_se(finals)
    best = mean_se([metric.best(r.score) for r in runs])

    # The paper's metric: on the seed-averaged curve, against the group's own final value.
    epochs, mean_score, _ = mean_curve(runs, "score")
    own = first_epoch_reaching(epochs, mean_score, metric.near(final.mean), metric)
    if own is None:  # cannot happen with equal-length runs (the last epoch qualifies); kept honest
        seconds_own = Estimate(None, None, 0, of)
    else:
        seconds_own = mean_se([seconds_until(r, own) for r in runs if own in r.epochs], of)

    # The common target: per seed, the first epoch at or above it.
    hits = [(r, first_epoch_reaching(r.epochs, r.score, target, metric)) for r in runs]
    reached = [(r, e) for r, e in hits if e is not None]
    return GroupResult(
        group=group, runs=[r.name for r in runs], final_accuracy=final, best_accuracy=best,
        epochs_to_own=own, seconds_to_own=seconds_own,
        epochs_to_target=mean_se([float(e) for _, e in reached], of),
        seconds_to_target=mean_se([seconds_until(r, e) for r, e in reached], of),
        seconds_to_target_with_eval=mean_se([seconds_until(r, e, with_eval=True) for r, e in reached], of),
        curves=group_curves(group, runs))


def group_curves(label: str, runs: Sequence[RunCurves]) -> GroupCurves:
    series = {}
    epochs: list[int] = []
    for metric in ("score", "wall_seconds", "batch_size", "lr", "samples_seen"):
        e, mean, se = mean_curve(runs, metric)
        if metric == "score":
            epochs = e
        if e == epochs:
            series[metric] = (mean, se)
    measured = {}
    e, mean, se = mean_curve(runs, "noise_scale")
    if e:
        measured["noise_scale"] = (e, mean, se)
    return GroupCurves(label, epochs, series, measured)


def compare(runs: Sequence[RunCurves], *, baseline: str | None = None, target: float | None = None,
            what: str = "runs", skipped: Sequence[str] = (), metric: Metric | None = None) -> Comparison:
    """Group ``runs`` (in order of first appearance) and fill in every number of the table."""
    metric = metric or METRICS["test_accuracy"]
    groups: dict[str, list[RunCurves]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    if not groups:
        raise UserError(f"{what}: no finished runs with a {metric.key} to compare"
                        + (f" ({len(skipped)} left out: {'; '.join(skipped[:5])})" if skipped else "."))
    baseline = baseline if baseline is not None else next(iter(groups))
    if baseline not in groups:
        raise UserError(f"--baseline {baseline!r} is not one of the groups: {', '.join(groups)}")
    if target is None:
        base_final = mean_se([r.score[-1] for r in groups[baseline]]).mean
        target, source = metric.near(base_final), f"{baseline}'s {metric.near_words}"
    else:
        source = "--target"
    results = [summarize_group(name, members, target, metric) for name, members in groups.items()]
    base = next(r for r in results if r.group == baseline)
    for result in results:
        result.speedup_own = _ratio(base.seconds_to_own, result.seconds_to_own)
        result.speedup_target = _ratio(base.seconds_to_target, result.seconds_to_target)
    return Comparison(what, baseline, target, source, results, list(skipped), metric=metric)


def _ratio(baseline: Estimate, other: Estimate) -> float | None:
    """baseline / other, only when every seed of both reached the mark (else it would flatter one)."""
    if not (baseline.reached and other.reached) or baseline.n < baseline.of or other.n < other.of:
        return None
    return baseline.mean / other.mean if other.mean > 0 else None


# --------------------------------------------------------------------------------------------
# From MLflow runs
# --------------------------------------------------------------------------------------------


def group_of(record: Any, group_by: str) -> str:
    """The group of a run: ``name`` (its name without ``-seedN``), or params/tags joined by '/'.

    ``group_by`` is ``name``, a flattened param key (``policy.name``), ``tags.KEY``, or several of
    them separated by commas (``policy.name,policy.params.batch_size``).
    """
    parts = []
    for key in (k.strip() for k in group_by.split(",")):
        if key == "name":
            parts.append(_SEED_SUFFIX.sub("", record.name))
        elif key.startswith("tags."):
            parts.append(record.tags.get(key[len("tags."):], "?"))
        else:
            parts.append(record.params.get(key, "?"))
    return "/".join(parts)


def check_group_by(records: Sequence[Any], group_by: str) -> None:
    """Each key of ``--group-by`` must be known to at least one run; a typo would otherwise put
    every run into one group ``?`` and compare nothing."""
    import difflib

    for key in (k.strip() for k in group_by.split(",")):
        if key == "name":
            continue
        if key.startswith("tags."):
            known = sorted({f"tags.{t}" for r in records for t in r.tags if not t.startswith("mlflow.")})
        else:
            known = sorted({p for r in records for p in r.params})
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        kind = "tag" if key.startswith("tags.") else "param"
        raise UserError(f"--group-by {key}: no run here has the {kind} {key[len('tags.'):] if kind == 'tag' else key!r}."
                        f"{hint} Use name, a param such as policy.name, or tags.KEY.")


PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp", "svgz")


def check_plot_path(path: str) -> None:
    """``--plot`` must name a file matplotlib can write, in a folder that can be written: checked
    before the table is printed, so an error never comes after the output."""
    import os
    from pathlib import Path

    target = Path(path).expanduser()
    suffix = target.suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise UserError(f"--plot {path}: unknown image type {('.' + suffix) if suffix else '(no extension)'}; "
                        f"end the name with one of .{', .'.join(PLOT_FORMATS)}")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"--plot {path}: folder {folder} does not exist. Create it or choose another path.")
    if target.is_dir():
        raise UserError(f"--plot {path} is a folder; give a file name such as {target / 'curves.png'}")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UserError(f"--plot {path}: {target if target.exists() else folder} is not writable. "
                        f"Choose another path.")


def curves_from_record(record: Any, group: str, metric: str = "test_accuracy") -> RunCurves | None:
    """The run's per-epoch curves, or None when it logged no ``metric``."""
    history = record.history
    score = history.get(metric) or {}
    epochs = sorted(score)
    if not epochs:
        return None

    def column(name: str) -> list[float]:
        values = history.get(name) or {}
        return [values.get(e, math.nan) for e in epochs]

    def param(key: str) -> int | None:
        text = record.params.get(key)
        return int(text) if text is not None and text.isdigit() else None

    return RunCurves(record.name, group, epochs, [score[e] for e in epochs], column("epoch_seconds"),
                     column("eval_seconds"), column("wall_seconds"), column("batch_size"), column("lr"),
                     column("samples_seen"), noise_scales(column("diversity"), column("diversity_samples")),
                     param("dbx.train_size"), param("dbx.world_size"))


def choose_metric(name: str, records: Sequence[Any]) -> Metric:
    """``--metric``: a key of ``METRICS``, or ``auto``: perplexity when every finished run logged it
    (language models), the test accuracy otherwise."""
    if name == "auto":
        finished = [r for r in records if r.status == "FINISHED"]
        logs_perplexity = bool(finished) and all(r.history.get("test_perplexity") for r in finished)
        name = "test_perplexity" if logs_perplexity else "test_accuracy"
    if name not in METRICS:
        raise UserError(f"--metric {name!r} is not one of auto, {', '.join(METRICS)}")
    return METRICS[name]


def _check_target(target: float, metric: Metric) -> None:
    if metric.percent and not 0.0 <= target <= 1.0:
        raise UserError(f"--target {target:g} is not an accuracy between 0 and 1 (write 0.9 for 90%).")
    if metric.key == "test_perplexity" and target < 1.0:
        raise UserError(f"--target {target:g} is not a perplexity (they are at least 1).")


def load_comparison(uri: str, *, experiment: str | None = None, parent: str | None = None,
                    group_by: str = "name", baseline: str | None = None, target: float | None = None,
                    metric: str = "auto") -> Comparison:
    """``compare`` over the finished runs of a sweep, of an experiment, or of the latest sweep."""
    from dbx import tracking

    if target is not None and metric in METRICS:
        _check_target(target, METRICS[metric])
    what, records = tracking.runs_to_compare(uri, experiment=experiment, parent=parent)
    chosen = choose_metric(metric, records)
    if target is not None:
        _check_target(target, chosen)
    check_group_by(records, group_by)
    runs, skipped = [], []
    for record in records:
        if record.status != "FINISHED":
            skipped.append(f"{record.name} ({record.status})")
            continue
        curves = curves_from_record(record, group_of(record, group_by), chosen.key)
        if curves is None:
            skipped.append(f"{record.name} (no {chosen.key})")
            continue
        runs.append(curves)
    comparison = compare(runs, baseline=baseline, target=target, what=what, skipped=skipped, metric=chosen)
    for run in runs:
        if run.train_size is not None:
            sizes = comparison.train_sizes.setdefault(run.group, [])
            if run.train_size not in sizes:
                sizes.append(run.train_size)
    comparison.parents = sorted({r.tags["mlflow.parentRunId"] for r in records if "mlflow.parentRunId" in r.tags})
    return comparison


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

COLUMNS = ("group", "runs", "final acc %", "best acc %", "epochs to ±1%", "train s to ±1%", "speedup ±1%",
           "epochs to target", "train s to target", "train+eval s to target", "speedup target")
NOT_REACHED = "not reached"


def columns(comparison: Comparison) -> tuple[str, ...]:
    """The table's headings, named after the compared metric."""
    label = comparison.metric.label
    return (COLUMNS[0], COLUMNS[1], f"final {label}", f"best {label}", *COLUMNS[4:])


def _score(e: Estimate, metric: Metric) -> str:
    return _fmt(e, scale=100.0, digits=2) if metric.percent else _fmt(e, digits=3)


def _fmt(e: Estimate, scale: float = 1.0, digits: int = 2) -> str:
    if not e.reached:
        return NOT_REACHED
    text = f"{e.mean * scale:.{digits}f}"
    if e.se is not None:
        text += f" ± {e.se * scale:.{digits}f}"
    if e.n < e.of:
        text += f" ({e.n}/{e.of})"
    return text


def _speed(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "n/a"


def rows(comparison: Comparison) -> list[list[str]]:
    """The table's rows as text, in ``COLUMNS`` order."""
    out = []
    for g in comparison.groups:
        out.append([
            g.group + (" (baseline)" if g.group == comparison.baseline else ""), str(len(g.runs)),
            _score(g.final_accuracy, comparison.metric), _score(g.best_accuracy, comparison.metric),
            str(g.epochs_to_own) if g.epochs_to_own is not None else NOT_REACHED, _fmt(g.seconds_to_own),
            _speed(g.speedup_own),
            _fmt(g.epochs_to_target, digits=1), _fmt(g.seconds_to_target), _fmt(g.seconds_to_target_with_eval),
            _speed(g.speedup_target)])
    return out


def notes(comparison: Comparison) -> list[str]:
    metric = comparison.metric
    name = metric.key.replace("_", " ")
    lines = [
        f"Runs: {comparison.what}. Mean ± standard error over seeds.",
        f"±1%: the paper's metric: first epoch where the seed-averaged {name} reaches the group's own "
        f"{metric.near_words}; seconds are training time only (evaluation excluded).",
        f"target: the common target {name} {metric.show(comparison.target)} ({comparison.target_source}), "
        "first reached per seed; (k/n): only k of the n seeds reached it, 'not reached': none did.",
        f"speedup: {comparison.baseline} seconds / group seconds (n/a unless every seed of both reached).",
    ]
    sizes = sorted({n for group in comparison.train_sizes.values() for n in group})
    if len(sizes) == 1:
        lines.append(f"Every run trained on n = {sizes[0]} samples.")
    elif sizes:
        by_group = "; ".join(f"{g}: {', '.join(map(str, ns))}" for g, ns in comparison.train_sizes.items())
        lines.append(f"Warning: the runs trained on different numbers of samples n ({by_group}), so their "
                     f"epochs are not the same amount of work.")
    if comparison.skipped:
        lines.append(f"Left out: {', '.join(comparison.skipped)}.")
    return lines


def render(comparison: Comparison, fmt: str) -> str:
    """The comparison as ``table`` (rich, for a terminal), ``markdown``, ``csv`` or ``json``."""
    if fmt == "markdown":
        header = "| " + " | ".join(columns(comparison)) + " |"
        rule = "|" + "|".join("---" if i == 0 else "--:" for i in range(len(COLUMNS))) + "|"
        body = ["| " + " | ".join(r) + " |" for r in rows(comparison)]
        return "\n".join([header, rule, *body, "", *(f"- {line}" for line in notes(comparison))]) + "\n"
    if fmt == "csv":
        return _csv(comparison)
    if fmt == "json":
        return json.dumps(to_dict(comparison), indent=2) + "\n"
    if fmt == "table":
        return _rich_table(comparison)
    raise UserError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _rich_table(comparison: Comparison) -> str:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    metric = comparison.metric
    table = Table(title=f"target {metric.key.replace('_', ' ')} {metric.show(comparison.target)}  ·  "
                        f"baseline {comparison.baseline}", title_justify="left", box=box.SIMPLE_HEAD)
    for i, column in enumerate(columns(comparison)):
        header = re.sub(r" (to |±1%$|target$|acc)", r"\n\1", column, count=1) if i else column
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows(comparison):
        table.add_row(*row)
    # the table's own width, never squeezed: a narrow terminal wraps lines rather than losing digits
    console = Console(width=250, record=True, file=io.StringIO(), force_terminal=False)
    console.print(table)
    for line in notes(comparison):
        console.print(line, highlight=False, soft_wrap=True)
    return console.export_text()


def to_dict(comparison: Comparison) -> dict[str, Any]:
    """Plain data (JSON): every estimate with mean, se, n and of; null where not reached."""
    groups = []
    for g in comparison.groups:
        entry = asdict(g)
        entry.pop("curves")
        entry["baseline"] = g.group == comparison.baseline
        groups.append(entry)
    for entry in groups:
        entry["train_size"] = comparison.train_sizes.get(entry["group"], [])
    return {"what": comparison.what, "metric": comparison.metric.key, "baseline": comparison.baseline,
            "target": comparison.target,
            "target_source": comparison.target_source, "skipped": comparison.skipped, "groups": groups}


def _csv(comparison: Comparison) -> str:
    """One row per group; each estimate as mean, se and the number of seeds it covers. Empty
    cells (never 0) where a group did not reach a mark."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    estimates = ("final_accuracy", "best_accuracy", "seconds_to_own", "epochs_to_target", "seconds_to_target",
                 "seconds_to_target_with_eval")
    header = ["group", "baseline", "runs", "epochs_to_own", "speedup_own", "speedup_target", "target"]
    for name in estimates:
        header += [f"{name}_mean", f"{name}_se", f"{name}_n"]
    writer.writerow(header)

    def cell(value: Any) -> str:
        return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))

    for g in comparison.groups:
        row = [g.group, str(g.group == comparison.baseline).lower(), len(g.runs), cell(g.epochs_to_own),
               cell(g.speedup_own), cell(g.speedup_target), cell(comparison.target)]
        for name in estimates:
            e = getattr(g, name)
            row += [cell(e.mean), cell(e.se), f"{e.n}/{e.of}"]
        writer.writerow(row)
    return buffer.getvalue()


def figure(comparison: Comparison) -> Any:
    """The comparison plots (matplotlib figure): see ``dbx.plots.comparison_curves``."""
    from dbx.plots import comparison_curves

    return comparison_curves([g.curves for g in comparison.groups if g.curves is not None],
                             target=comparison.target, ylabel=comparison.metric.key.replace("_", " "))


def save_plot(comparison: Comparison, path: str) -> None:
    import matplotlib.pyplot as plt

    fig = figure(comparison)
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:  # e.g. the disk filled up since check_plot_path
        raise UserError(f"--plot {path}: cannot write it ({exc.strerror or exc}).") from None
    finally:
        plt.close(fig)


def attach(comparison: Comparison, uri: str, run_id: str) -> None:
    """Log the table (markdown, csv, json) and the plots as artifacts of ``run_id`` (``comparison/``)."""
    import tempfile
    from pathlib import Path

    from dbx import tracking

    with tempfile.TemporaryDirectory() as folder:
        files = {}
        for fmt, name in (("markdown", "comparison.md"), ("csv", "comparison.csv"), ("json", "comparison.json")):
            Path(folder, name).write_text(render(comparison, fmt))
            files[f"comparison/{name}"] = str(Path(folder, name))
        save_plot(comparison, str(Path(folder, "curves.png")))
        files["comparison/curves.png"] = str(Path(folder, "curves.png"))
        tracking.log_files(uri, run_id, files)

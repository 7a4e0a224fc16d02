"""Figures a person would rather look at than read: one run's curves against epochs, and the
comparison of several groups of runs (``dbx compare --plot``)."""
from __future__ import annotations

import math
from typing import Any, Sequence


def training_curves(history: list[dict[str, float]]) -> Any:
    """A 2x2 figure: test/train accuracy (or loss), loss, batch size and learning rate per epoch."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    (acc_ax, loss_ax), (batch_ax, lr_ax) = axes
    if any("test_accuracy" in h for h in history):
        acc_ax.plot(epochs, [h.get("train_accuracy") for h in history], label="train")
        acc_ax.plot(epochs, [h.get("test_accuracy") for h in history], label="test")
        acc_ax.set_ylabel("accuracy")
        acc_ax.legend()
    else:
        acc_ax.set_visible(False)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    loss_ax.plot(epochs, [h["test_loss"] for h in history], label="test")
    loss_ax.set_ylabel("loss")
    loss_ax.set_yscale("log")
    loss_ax.legend()
    batch_ax.step(epochs, [h["batch_size"] for h in history], where="post", label="batch size")
    measured = [(h["epoch"], h["diversity_samples"] * h["diversity"] - 1) for h in history
                if "diversity" in h and h.get("diversity_samples") and math.isfinite(h["diversity"])]
    if measured:  # the batch size beyond which a larger one stops paying: what DiveBatch follows
        batch_ax.plot(*zip(*measured, strict=True), "o--", alpha=0.7, label="noise scale m·diversity − 1")
        batch_ax.legend(fontsize=8)
    batch_ax.set_ylabel("batch size")
    batch_ax.set_yscale("log", base=2)
    lr_ax.plot(epochs, [h["lr"] for h in history])
    lr_ax.set_ylabel("learning rate")
    for ax in (batch_ax, lr_ax):
        ax.set_xlabel("epoch")
    figure.tight_layout()
    return figure


def comparison_curves(groups: Sequence[Any], *, target: float | None = None, ylabel: str = "test accuracy") -> Any:
    """A 2x3 figure, one line per group with a band of +-1 standard error over seeds: the compared
    metric (``ylabel``: test accuracy, or perplexity) against epochs, wall seconds and samples seen
    (epochs x n: the same work for every policy); batch size and lr against epochs; and the
    gradient noise scale m·diversity − 1 of the measuring epochs, the batch size beyond which a
    larger one stops paying. ``groups`` are ``dbx.report.GroupCurves``: ``label``, ``epochs``,
    ``series`` (``score``, ``wall_seconds``, ``samples_seen``, ``batch_size``, ``lr`` -> (mean per
    epoch, standard error per epoch)) and ``measured`` (metric -> (epochs, mean, se))."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    (acc_ax, time_ax, samples_ax), (batch_ax, lr_ax, noise_ax) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, group in enumerate(groups):
        color = colors[index % len(colors)]
        epochs = group.epochs
        series = group.series
        if "score" in series:
            mean, se = series["score"]
            _line_with_band(acc_ax, epochs, mean, se, color, group.label)
            for metric, ax in (("wall_seconds", time_ax), ("samples_seen", samples_ax)):
                if metric in series:
                    _line_with_band(ax, series[metric][0], mean, se, color, group.label)
        if "batch_size" in series:
            _line_with_band(batch_ax, epochs, *series["batch_size"], color, group.label, step=True)
        if "lr" in series:
            _line_with_band(lr_ax, epochs, *series["lr"], color, group.label)
        if "noise_scale" in getattr(group, "measured", {}):
            at, mean, se = group.measured["noise_scale"]
            _line_with_band(noise_ax, at, mean, se, color, group.label, marker="o")
    for ax in (acc_ax, time_ax, samples_ax):
        ax.set_ylabel(ylabel)
        if "perplexity" in ylabel:  # from hundreds at the start to a few at the end
            ax.set_yscale("log")
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1, label="common target")
    acc_ax.set_xlabel("epoch")
    time_ax.set_xlabel("wall seconds since the start (mean over seeds)")
    samples_ax.set_xlabel("training samples seen")
    batch_ax.set_ylabel("batch size")
    batch_ax.set_yscale("log", base=2)
    lr_ax.set_ylabel("learning rate")
    noise_ax.set_ylabel("noise scale m·diversity − 1")
    if noise_ax.has_data():
        noise_ax.set_yscale("log", base=2)
    else:
        noise_ax.text(0.5, 0.5, "no diversity measured", ha="center", va="center", transform=noise_ax.transAxes,
                      color="grey")
    for ax in (batch_ax, lr_ax, noise_ax):
        ax.set_xlabel("epoch")
    for ax in (acc_ax, batch_ax, lr_ax, noise_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)
    figure.suptitle("mean over seeds, band: ±1 standard error")
    figure.tight_layout()
    return figure


def _line_with_band(ax: Any, x: Sequence[float], mean: Sequence[float], se: Sequence[float], color: str,
                    label: str, step: bool = False, marker: str | None = None) -> None:
    low = [m - s for m, s in zip(mean, se, strict=True)]
    high = [m + s for m, s in zip(mean, se, strict=True)]
    if step:
        ax.step(x, mean, where="post", color=color, label=label)
        ax.fill_between(x, low, high, step="post", color=color, alpha=0.2, linewidth=0)
    else:
        ax.plot(x, mean, color=color, label=label, marker=marker)
        ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)

"""Figures a person would rather look at than read: one run's curves against epochs."""
from __future__ import annotations

from typing import Any


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
    batch_ax.step(epochs, [h["batch_size"] for h in history], where="post")
    batch_ax.set_ylabel("batch size")
    batch_ax.set_yscale("log", base=2)
    lr_ax.plot(epochs, [h["lr"] for h in history])
    lr_ax.set_ylabel("learning rate")
    for ax in (batch_ax, lr_ax):
        ax.set_xlabel("epoch")
    figure.tight_layout()
    return figure

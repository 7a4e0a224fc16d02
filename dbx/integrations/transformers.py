"""Hugging Face ``transformers``: ``DiversityCallback``, gradient diversity logged from ``Trainer.train``.

::

    from dbx.integrations.transformers import DiversityCallback

    trainer = Trainer(model=model, args=TrainingArguments(..., report_to=["mlflow"]), train_dataset=train)
    trainer.add_callback(DiversityCallback(trainer, exclude=["*position_embeddings"]))
    trainer.train()            # logs `diversity` (and its sums) at the end of every measured epoch

The callback measures every ``every``-th epoch with a ``dbx.DiversityMeter`` on the trainer's
model and hands the values to ``trainer.log``, so every reporting integration of the Trainer
(MLflow, TensorBoard, W&B, ...) receives them, at the trainer's global step. The Trainer clips
the gradients before ``on_pre_optimizer_step``, so the meter keeps its own copy of each
backward's gradients (``copy_grads``), and divides out the GradScaler's scale under fp16.

Resizing the batch here is not offered: the Trainer builds its DataLoader once per ``train()``
and computes ``max_steps``, the lr schedule's length and the epoch boundaries from the first batch
size, so a batch size changed between epochs would leave those wrong. Train with
``dbx.integrations.lightning`` or your own loop (``dbx.AdaptiveBatchSize``) for that.

Models whose position embeddings are looked up with a ``(1, T)`` index (BERT, GPT-2, ...) need
``exclude=["*position_embeddings"]``: that lookup is shared by the batch, so it has no per-sample
input for the hooks. The meter's error names any such module.
"""
from __future__ import annotations

from typing import Any, Sequence

from dbx.integrations import require

require("transformers", "transformers")

from transformers import TrainerCallback  # noqa: E402

from dbx.errors import UserError  # noqa: E402
from dbx.meter import DiversityMeter  # noqa: E402

__all__ = ["DiversityCallback"]


class DiversityCallback(TrainerCallback):
    """Gradient diversity in a Hugging Face ``Trainer``, logged through ``trainer.log``.

    ``DiversityCallback(trainer, *, every=1, layers=None, exclude=(), per_layer=False,
    reduction="mean")``: add it with ``trainer.add_callback(...)``. ``layers``, ``exclude`` and
    ``reduction`` are the ``dbx.DiversityMeter``'s (``mean``: the Trainer's loss is a mean over the
    step's samples, as for sequence classification); ``per_layer`` also logs
    ``diversity/<module path>``. ``history`` holds what was logged, one dict per measured epoch.
    """

    def __init__(self, trainer: Any, *, every: int = 1, layers: Sequence[str] | None = None,
                 exclude: Sequence[str] = (), per_layer: bool = False, reduction: str = "mean") -> None:
        if not (isinstance(every, int) and every > 0):
            raise UserError(f"DiversityCallback(every={every!r}): a positive number of epochs")
        self.trainer = trainer
        self.every = every
        self.meter_options = {"layers": layers, "exclude": exclude, "reduction": reduction}
        self.per_layer = per_layer
        self.meter: DiversityMeter | None = None
        self.history: list[dict[str, float]] = []
        self._epoch = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        scaler = getattr(getattr(self.trainer, "accelerator", None), "scaler", None)
        copy = scaler is not None or (args.max_grad_norm or 0) > 0  # both change .grad before our hook
        self.meter = DiversityMeter(model if model is not None else self.trainer.model, scaler=scaler,
                                    copy_grads=copy, **self.meter_options)
        self._epoch = int(state.epoch or 0)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch += 1
        if self._epoch % self.every == 0:
            self.meter.start()
        else:
            self.meter.result = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.meter.pending_backwards:
            self.meter.step()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.meter.measuring:
            return
        self.meter.stop()
        logs = self.meter.metrics(per_layer=self.per_layer)
        self.history.append({"epoch": float(self._epoch), **logs})
        self.trainer.log(dict(logs))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.meter is not None and self.meter.measuring:  # training stopped mid-epoch: hooks off
            self.meter.cancel()

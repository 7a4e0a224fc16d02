"""PyTorch Lightning: ``DiversityCallback``, gradient diversity and adaptive batch sizes in ``Trainer.fit``.

::

    from dbx.integrations.lightning import DiversityCallback

    trainer = L.Trainer(max_epochs=30, reload_dataloaders_every_n_epochs=1, logger=MLFlowLogger(...),
                        callbacks=[DiversityCallback("divebatch", {"initial": 32, "max": 1024, "delta": 0.1,
                                                                   "resize_every": 5}, lr_scaling="linear")])
    trainer.fit(model, datamodule=data)   # train_dataloader() builds its DataLoader from self.batch_size

Given a policy (any name ``dbx plugins`` lists, with its params as in a spec), the callback
measures the epochs the policy asks for with a ``dbx.DiversityMeter``, logs ``diversity`` and
``batch_size`` through ``LightningModule.log`` (so every logger of the trainer gets them,
MLflow's included), and after each epoch sets the batch size the policy chose on the module,
its ``hparams`` or the datamodule (the attribute ``batch_size_attr``, found as Lightning's own
batch-size finder finds it), so that the next epoch's reloaded ``train_dataloader()`` uses it.
The lr rule (``lr_scaling`` times the policy's ``lr_factor``) multiplies every optimizer's lr and
its schedulers' ``base_lrs``. Without a policy it only measures, every ``every``-th epoch.

The meter counts the step in ``on_before_optimizer_step``, before Lightning clips the gradients.
With ``accumulate_grad_batches=k`` the DataLoader's batch size is the policy's batch size, and
each optimizer step accumulates k of them (Lightning divides each loss by k; the meter's ``mean``
reduction matches). Under 16-bit mixed precision the meter divides the GradScaler's scale out.
Automatic optimization, one optimizer; one device (multi-device: not yet).
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

from dbx.integrations import require

require("lightning.pytorch", "lightning")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr  # noqa: E402

from dbx.adaptive import AdaptiveBatchSize  # noqa: E402
from dbx.errors import UserError  # noqa: E402
from dbx.meter import DiversityMeter  # noqa: E402

__all__ = ["DiversityCallback"]


class DiversityCallback(pl.Callback):
    """Gradient diversity in Lightning, and the batch size a dbx policy chooses from it.

    ``DiversityCallback(policy=None, params=None, *, lr_scaling="none", every=1, dataset_size=None,
    batch_size_attr="batch_size", layers=None, exclude=(), per_layer=False)``:

    - ``policy``, ``params``: a policy name and its params as in a spec (or a policy object);
      ``dataset_size`` (the training samples the policy's rule uses) is read from
      ``len(train_dataloader().dataset)`` when not given;
    - ``lr_scaling``: ``none``, ``linear`` or ``sqrt``, applied whenever the batch size changes;
    - ``every``: without a policy, measure every ``every``-th epoch;
    - ``layers``, ``exclude``: as for ``dbx.DiversityMeter``; ``per_layer`` also logs
      ``diversity/<module path>``.

    ``history`` holds one dict per epoch: epoch, batch_size, and diversity when measured.
    """

    def __init__(self, policy: Any = None, params: dict[str, Any] | None = None, *, lr_scaling: str = "none",
                 every: int = 1, dataset_size: int | None = None, batch_size_attr: str = "batch_size",
                 layers: Sequence[str] | None = None, exclude: Sequence[str] = (), per_layer: bool = False) -> None:
        if not (isinstance(every, int) and every > 0):
            raise UserError(f"DiversityCallback(every={every!r}): a positive number of epochs")
        self.policy_spec = (policy, params)
        self.lr_scaling = lr_scaling
        self.every = every
        self.dataset_size = dataset_size
        self.batch_size_attr = batch_size_attr
        self.meter_options = {"layers": layers, "exclude": exclude}
        self.per_layer = per_layer
        self.adaptive: AdaptiveBatchSize | None = None
        self.meter: DiversityMeter | None = None
        self.history: list[dict[str, float]] = []
        self._restored: dict[str, Any] | None = None
        self._epoch_started = self._last_step_ended = math.nan

    # -- set-up -------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # Lightning unscales fp16 gradients before on_before_optimizer_step: the meter keeps its own copy
        self.meter = DiversityMeter(pl_module, scaler=scaler, copy_grads=scaler is not None, **self.meter_options)
        policy, params = self.policy_spec
        if policy is None:
            return
        if not lightning_hasattr(pl_module, self.batch_size_attr):
            raise UserError(
                f"DiversityCallback: the policy sets the batch size through `{self.batch_size_attr}`, which neither "
                f"the LightningModule, its hparams nor the datamodule has. Give one of them that attribute and build "
                f"the training DataLoader from it in train_dataloader() (or pass batch_size_attr=...)")
        if not trainer.reload_dataloaders_every_n_epochs:
            raise UserError("DiversityCallback: a new batch size needs a new training DataLoader each epoch: "
                            "create the Trainer with reload_dataloaders_every_n_epochs=1")
        size = self.dataset_size or _training_set_size(trainer, pl_module)
        self.adaptive = AdaptiveBatchSize(policy, params, dataset_size=size, lr_scaling=self.lr_scaling,
                                          epochs=trainer.max_epochs if (trainer.max_epochs or -1) > 0 else None)
        self._module = pl_module
        lightning_setattr(pl_module, self.batch_size_attr, self.adaptive.batch_size)
        if self._restored is not None:
            self._restore()

    # -- each epoch ---------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        self._epoch_started = self._last_step_ended = time.perf_counter()
        if self.adaptive is not None:
            used = _loader_batch_size(trainer.train_dataloader)
            if used is not None and used != self.adaptive.batch_size:
                raise UserError(
                    f"DiversityCallback: epoch {epoch}'s training DataLoader has batch size {used}, but the policy chose "
                    f"{self.adaptive.batch_size}: build the DataLoader in train_dataloader() from "
                    f"self.{self.batch_size_attr} (not one passed to trainer.fit), with "
                    f"reload_dataloaders_every_n_epochs=1")
            measure = self.adaptive.measures_in(epoch)
        else:
            measure = epoch % self.every == 0
        if measure:
            self.meter.start()
        else:
            self.meter.result = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.meter.pending_backwards:  # a training_step that returned None ran no backward
            self.meter.step()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Lightning validates before on_train_epoch_end: the last step's end bounds the training time
        self._last_step_ended = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        estimate = self.meter.stop() if self.meter.measuring else None
        batch = self.adaptive.batch_size if self.adaptive is not None else _loader_batch_size(trainer.train_dataloader)
        row: dict[str, float] = {"epoch": float(epoch)}
        if batch is not None:
            row["batch_size"] = float(batch)
        if estimate is not None:
            row.update(self.meter.metrics(per_layer=self.per_layer))
        for key, value in row.items():
            if key != "epoch":
                pl_module.log(key, value, on_step=False, on_epoch=True, prog_bar=key in ("diversity", "batch_size"))
        self.history.append(row)
        if self.adaptive is None:
            return
        metrics = trainer.callback_metrics
        change = self.adaptive.end_epoch(
            epoch, estimate, lr=_current_lr(trainer), train_loss=_metric(metrics, "train_loss"),
            test_loss=_metric(metrics, "val_loss"), seconds=self._last_step_ended - self._epoch_started)
        if change.changed:
            lightning_setattr(pl_module, self.batch_size_attr, change.batch_size)
            _scale_lr(trainer, change.lr_factor)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.meter is not None and self.meter.measuring:  # fit stopped mid-epoch: hooks off
            self.meter.cancel()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.adaptive is None:
            return {}
        return {"adaptive": self.adaptive.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning restores a checkpoint after ``setup``: the policy continues where it stopped."""
        self._restored = dict(state_dict) if state_dict else None
        if self._restored is not None and self.adaptive is not None:
            self._restore()

    def _restore(self) -> None:
        self.adaptive.load_state_dict(self._restored["adaptive"])
        self.history = list(self._restored["history"])
        lightning_setattr(self._module, self.batch_size_attr, self.adaptive.batch_size)


def _training_set_size(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
    source = trainer.datamodule if trainer.datamodule is not None else pl_module
    try:
        return len(source.train_dataloader().dataset)
    except Exception as exc:  # noqa: BLE001 - any failure means: cannot tell here
        raise UserError(
            f"DiversityCallback: cannot tell the training set's size before fit starts "
            f"({type(exc).__name__}: {exc}); pass dataset_size=len(your_training_set)") from exc


def _loader_batch_size(loaders: Any) -> int | None:
    loader = loaders if not isinstance(loaders, (list, tuple, dict)) else None
    if loader is None:
        return None
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size if isinstance(size, int) else None


def _current_lr(trainer: pl.Trainer) -> float:
    return float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else math.nan


def _metric(metrics: dict[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float(value) if value is not None else math.nan


def _scale_lr(trainer: pl.Trainer, factor: float) -> None:
    """lr *= factor for every optimizer, and for the schedulers that recompute it from base_lrs."""
    if factor == 1.0:
        return
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= factor
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]


"""dbx.integrations.lightning.DiversityCallback in a real Lightning Trainer.fit on the CPU."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

import dbx  # noqa: E402
from dbx.errors import UserError  # noqa: E402
from dbx.integrations.lightning import DiversityCallback  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class Classifier(pl.LightningModule):
    """A small MLP whose train_dataloader() is built from self.batch_size, as the callback asks."""

    def __init__(self, lr: float = 0.1, n: int = 240):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.lr, self.batch_size = lr, 8
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
        self.batches: dict[int, set[int]] = {}  # epoch -> the batch sizes training_step received

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True)

    def training_step(self, batch, index):
        x, y = batch
        self.batches.setdefault(self.current_epoch + 1, set()).add(len(x))
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def trainer(tmp_path, callback, **options):
    defaults = dict(max_epochs=3, accelerator="cpu", devices=1, reload_dataloaders_every_n_epochs=1,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    logger=False, default_root_dir=str(tmp_path))
    return pl.Trainer(callbacks=[callback], **{**defaults, **options})


def test_divebatch_changes_the_batch_size_between_epochs_and_mlflow_holds_diversity_and_batch_size(tmp_path, fresh_mlflow):
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    model = Classifier()
    callback = DiversityCallback("divebatch", {"initial": 8, "max": 120, "delta": 0.1, "resize_every": 1},
                                 lr_scaling="linear")
    trainer(tmp_path, callback, logger=MLFlowLogger(experiment_name="lightning", tracking_uri=uri)).fit(model)

    sizes = [int(row["batch_size"]) for row in callback.history]
    assert len(set(sizes)) >= 2, callback.history  # the policy changed it
    for epoch, size in enumerate(sizes, 1):  # and each epoch's DataLoader really used it
        assert max(model.batches[epoch]) == size
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * callback.adaptive.lr_scale)

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lightning").experiment_id])
    history = {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
               for key in ("diversity", "batch_size")}
    assert history["batch_size"] == [float(s) for s in sizes]
    measured = [row["diversity"] for row in callback.history if "diversity" in row]
    assert len(history["diversity"]) == len(measured) == 3  # every epoch measured: B stayed below max
    assert history["diversity"] == pytest.approx(measured, rel=1e-6)


def test_the_logged_diversity_is_the_exact_one_with_accumulation_and_clipping(tmp_path):
    """At lr 0 the weights stay put, so an epoch's diversity is the whole training set's at those weights."""
    model = Classifier(lr=0.0, n=96)
    callback = DiversityCallback(every=2)
    trainer(tmp_path, callback, max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=1e-3).fit(model)
    expected = dbx.per_sample_sq_norms(model.net, F.cross_entropy, model.x, model.y).diversity()
    (row,) = [r for r in callback.history if "diversity" in r]  # epoch 2 only
    assert row["epoch"] == 2 and row["diversity_samples"] == 96
    assert row["diversity"] == pytest.approx(expected, rel=1e-5)


def test_a_trainer_that_keeps_its_first_dataloader_is_refused_with_the_fix(tmp_path):
    callback = DiversityCallback("adabatch", {"initial": 8, "every": 1})
    with pytest.raises(UserError, match="reload_dataloaders_every_n_epochs=1"):
        trainer(tmp_path, callback, reload_dataloaders_every_n_epochs=0).fit(Classifier())


def test_a_module_without_a_batch_size_attribute_is_refused_with_the_fix(tmp_path):
    model = Classifier()
    model.size = model.batch_size
    del model.batch_size
    with pytest.raises(UserError, match="through `batch_size`.*build the training DataLoader from it"):
        trainer(tmp_path, DiversityCallback("adabatch", {"initial": 8, "every": 1})).fit(model)


def test_a_dataloader_passed_to_fit_cannot_be_resized_and_says_so(tmp_path):
    model = Classifier()
    loader = DataLoader(TensorDataset(model.x, model.y), batch_size=16)
    callback = DiversityCallback("adabatch", {"initial": 8, "every": 1})
    with pytest.raises(UserError, match="DataLoader has batch size 16, but the policy chose 8"):
        trainer(tmp_path, callback).fit(model, train_dataloaders=loader)


def test_a_plugin_policy_named_as_in_a_spec_drives_the_batch_size(tmp_path, site):
    from distributions import install

    install(site, "dbx-halving", "[dbx.policies]\nhalving = halving_policy:Halving\n", {"halving_policy": """
        class Halving:
            uses_diversity = False
            def __init__(self, *, start: int = 64):
                self.start = start
            def initial_batch_size(self):
                return self.start
            def measures_in(self, epoch):
                return False
            def next_batch_size(self, state, diversity):
                return max(1, state.batch_size // 2)
            def state_dict(self):
                return {}
            def load_state_dict(self, state):
                pass
        """})
    model = Classifier(n=96)
    callback = DiversityCallback("halving", {"start": 32}, lr_scaling="linear")
    trainer(tmp_path, callback).fit(model)
    assert [max(model.batches[epoch]) for epoch in (1, 2, 3)] == [32, 16, 8]
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 / 8)
    assert all("diversity" not in row for row in callback.history)  # the policy never asked to measure


def test_the_callback_times_each_epochs_training_steps_for_the_throughput_table(tmp_path):
    """goodput decides from samples/s per batch size: the callback reports the training steps' time
    (validation excluded), so the table fills under Lightning as it does under `dbx run`."""
    model = Classifier()
    callback = DiversityCallback("adabatch", {"initial": 8, "every": 1, "max": 64})
    trainer(tmp_path, callback).fit(model)

    table = callback.adaptive.throughput
    assert sorted(table) == [8, 16, 32]  # one entry per batch size trained, epochs 1-3
    for samples, seconds, epochs, best in table.values():
        assert samples == 240 and epochs == 1 and seconds > 0 and best == pytest.approx(samples / seconds)
    assert {int(row[0]): row[1:] for row in callback.adaptive.state_dict()["throughput"]} == table  # and it is in Lightning's checkpoints

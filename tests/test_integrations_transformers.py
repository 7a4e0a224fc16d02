"""dbx.integrations.transformers.DiversityCallback in a real Hugging Face Trainer on the CPU (a tiny BERT
built from a config: no download)."""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import dbx  # noqa: E402
from dbx.integrations.transformers import DiversityCallback  # noqa: E402


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def test_the_trainer_logs_the_exact_diversity_to_mlflow(tmp_path, monkeypatch, fresh_mlflow):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 50, (32, 10), generator=g), torch.randint(0, 2, (32,), generator=g)
    # lr 0: the weights stay put, so each epoch's diversity is the training set's at those weights,
    # whatever the accumulation (2 micro-batches per step) and the clipping (max_grad_norm 1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=2, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=0.0, lr_scheduler_type="constant", report_to=["mlflow"],
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    train = [{"input_ids": ids[i], "labels": labels[i]} for i in range(32)]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train)
    callback = DiversityCallback(trainer, exclude=["*position_embeddings"])
    trainer.add_callback(callback)
    trainer.train()

    expected = dbx.per_sample_sq_norms(Logits(model), F.cross_entropy, ids, labels,
                                       exclude=["*position_embeddings"]).diversity()
    assert [row["diversity"] for row in callback.history] == pytest.approx([expected] * 2, rel=1e-5)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hf").experiment_id])
    logged = [m.value for m in client.get_metric_history(run.info.run_id, "diversity")]
    assert logged == pytest.approx([expected] * 2, rel=1e-5)


def test_a_model_with_a_batch_shared_position_lookup_gets_an_error_naming_the_exclude():
    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8)
    meter = dbx.DiversityMeter(Logits(transformers.BertForSequenceClassification(config)))
    with pytest.raises(dbx.MeterError, match="batch-first inputs: module .*position_embeddings.*DiversityMeter.*exclude"):
        with meter.epoch():
            ids = torch.randint(0, 20, (4, 6))
            F.cross_entropy(meter.model(ids), torch.tensor([0, 1, 0, 1])).backward()
            meter.step()

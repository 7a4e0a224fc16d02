"""`dbx run` with the exact estimator on a GPT-style model built from nn.TransformerEncoderLayer (causal
mask, LayerNorm, untied and tied head), on dbx's own transformer_lm with a tied head, and on the LSTM
classifier: the diversity it logs for the first measured epoch equals an explicit per-sample oracle
that replays the same steps (same weights, data order and optimizer), one backward per sample."""
import random

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from dbx import registry
from dbx.cli import main
from dbx.spec import load_spec
from dbx.train.parts import build_parts

SPEC = """\
name: {name}
seed: 0
device: cpu
data: {data}
model: {model}
optimizer: {{name: sgd, params: {{lr: 0.05}}}}
epochs: 1
policy: {{name: divebatch, params: {{initial: 16, max: 64, resize_every: 1}}}}
estimator: {{name: exact}}
checkpoint: {{enabled: false}}
tracking: {{system_metrics: false}}
"""


def encoder_lm(*, num_classes, input_shape, width: int = 16, depth: int = 2, heads: int = 2,
               tie_head: bool = False):
    """A small GPT: token and position embeddings, causal nn.TransformerEncoderLayer blocks, LayerNorm, head."""

    class EncoderLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(num_classes, width)
            self.positions = nn.Embedding(input_shape[0], width)
            self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0,
                                                                   batch_first=True, norm_first=True)
                                        for _ in range(depth))
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, num_classes, bias=False)
            if tie_head:
                self.head.weight = self.tokens.weight

        def forward(self, idx):
            t = idx.shape[1]
            x = self.tokens(idx) + self.positions(torch.arange(t).expand_as(idx))
            mask = nn.Transformer.generate_square_subsequent_mask(t)
            for block in self.blocks:
                x = block(x, src_mask=mask, is_causal=True)
            return self.head(self.norm(x))

    return EncoderLM()


def write_text(folder):
    rng = random.Random(0)
    words = "the a model learns to predict next byte of text with small batches that grow".split()
    path = folder / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(220)))
    return path


def logged_diversity(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(main, ["run", str(tmp_path / "spec.yaml"), "--tracking-uri", uri],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [m.value for m in client.get_metric_history(run.info.run_id, "diversity")]


def explicit_first_epoch(tmp_path):
    """The run's first epoch replayed: per-sample gradients one sample at a time at each step's weights."""
    parts = build_parts(load_spec(tmp_path / "spec.yaml"), torch.device("cpu"))
    model, task = parts.model, parts.task
    model.train()
    params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
    sum_sq = 0.0
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for x, y in parts.train_loader:
        for i in range(x.shape[0]):
            grads = torch.autograd.grad(task.loss_fn(model(x[i:i + 1]).float(), y[i:i + 1], reduction="sum"), params)
            sum_sq += sum(float(g.double().square().sum()) for g in grads)
            for t, g in zip(total, grads, strict=True):
                t += g.double()
        loss = task.loss_fn(model(x).float(), y, reduction="sum") / task.units(y)
        loss.backward()
        parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)
    return sum_sq / sum(float(t.square().sum()) for t in total)


CASES = {
    "encoder-untied": ("{name: text_file, params: {path: {corpus}, seq_len: 16}}",
                       "{name: transformer_lm, params: {tie_head: false}}", encoder_lm),
    "encoder-tied": ("{name: text_file, params: {path: {corpus}, seq_len: 16}}",
                     "{name: transformer_lm, params: {tie_head: true}}", encoder_lm),
    "transformer_lm-tied": ("{name: text_file, params: {path: {corpus}, seq_len: 16}}",
                            "{name: transformer_lm, params: {width: 16, depth: 1, heads: 2, dropout: 0.0, "
                            "tie_head: true}}", None),
    "lstm_classifier": ("{name: digits, subset: 96}", "{name: lstm_classifier, params: {hidden: 12, layers: 2, "
                        "bidirectional: true}}", None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dbx_run_logs_the_explicit_per_sample_diversity(tmp_path, monkeypatch, name):
    import dbx.models.transformer

    data, model, factory = CASES[name]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_text(tmp_path)
    data = data.replace("{corpus}", str(tmp_path / "corpus.txt"))
    (tmp_path / "spec.yaml").write_text(SPEC.format(name=name, data=data, model=model))
    if factory is not None:
        monkeypatch.setattr(dbx.models.transformer, "transformer_lm", factory)
    registry.load.cache_clear()
    try:
        logged = logged_diversity(tmp_path)
        expected = explicit_first_epoch(tmp_path)
    finally:
        registry.load.cache_clear()
    assert logged and logged[0] == pytest.approx(expected, rel=1e-4)

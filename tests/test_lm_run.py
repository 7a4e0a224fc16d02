"""A language model trained by `dbx run` as a researcher would write it: AdamW, gradient clipping, a
small GPT on a local text file, DiveBatch with the exact estimator; and an AdamW run killed mid-epoch
resumes to exactly the uninterrupted result."""
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_reliability import final_weights, kill_during_epoch, newest_epoch, only_run, store, write

from dbx.cli import main

LM = """\
name: lm-tiny
seed: 0
device: cpu
data: {{name: text_file, params: {{path: {path}, seq_len: 32}}}}
model: {{name: transformer_lm, params: {{width: 32, depth: 2, heads: 2, dropout: {dropout}}}}}
optimizer: {{name: adamw, params: {{lr: 3e-4, weight_decay: 0.1}}}}
clip_grad_norm: 1.0
epochs: {epochs}
policy: {{name: divebatch, params: {{initial: 8, max: 256, delta: 10.0, resize_every: 1}}}}
estimator: {{name: exact}}
checkpoint: {{keep_last: 3}}
tracking: {{system_metrics: false}}
"""
CURVES = ["train_loss", "train_accuracy", "train_perplexity", "test_loss", "test_accuracy", "test_perplexity",
          "batch_size", "lr", "diversity", "grad_norm", "samples_seen", "optimizer_steps"]


def write_text(folder: Path, words: int = 800) -> Path:
    """English-like text with structure to learn: a small vocabulary in a fixed random order."""
    rng = random.Random(0)
    vocabulary = "the a model learns to predict next byte of text with small batches that grow".split()
    path = folder / "corpus.txt"
    path.write_text(" ".join(rng.choice(vocabulary) for _ in range(words)))
    return path


def metric_history(uri: str) -> dict[str, list[tuple[int, float]]]:
    client, run = only_run(uri)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) for key in CURVES}


def test_a_gpt_trained_with_adamw_clipping_and_divebatch_logs_perplexity_diversity_and_a_growing_batch(tmp_path):
    spec = write(tmp_path, LM.format(path=write_text(tmp_path), dropout=0.0, epochs=2))
    result = CliRunner().invoke(main, ["run", str(spec), "--tracking-uri", store(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    client, run = only_run(store(tmp_path))
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.name"] == "adamw" and run.data.params["optimizer.params.lr"] == "0.0003"
    assert run.data.params["clip_grad_norm"] == "1.0"
    assert run.data.tags["dbx.plugin.optimizer"].startswith("adamw (dbx ")
    history = metric_history(store(tmp_path))
    perplexity = [value for _, value in history["test_perplexity"]]
    assert len(perplexity) == 2 and perplexity[-1] < perplexity[0] < 256  # it learns (uniform: 256)
    assert [step for step, _ in history["diversity"]] == [1, 2]
    sizes = [value for _, value in history["batch_size"]]
    assert sizes[0] == 8 and len(set(sizes)) >= 2 and sizes == sorted(sizes), sizes
    assert all(0 < value for _, value in history["grad_norm"])
    assert {"final_test_perplexity", "best_test_perplexity", "final_test_accuracy"} <= set(run.data.metrics)
    assert "ppl" in result.output and "batch size" in result.output


@pytest.mark.slow
def test_a_killed_adamw_run_resumes_to_exactly_the_uninterrupted_curves(tmp_path):
    """Dropout on, so the generators matter too; AdamW's moments and step counts come back from the
    checkpoint, and the resumed run's curves and weights are bit for bit the uninterrupted run's."""
    text = write_text(tmp_path, words=2000)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    spec_text = LM.format(path=text, dropout=0.1, epochs=3)
    result = CliRunner().invoke(main, ["run", str(write(straight, spec_text)), "--tracking-uri", store(straight)])
    assert result.exit_code == 0, result.output

    run_id = kill_during_epoch(write(killed, spec_text), killed, after_checkpoint=1)
    assert newest_epoch(killed, run_id) == 1, "the kill came after epoch 2 had ended"
    result = CliRunner().invoke(main, ["resume", run_id, "--tracking-uri", store(killed)])
    assert result.exit_code == 0, result.output
    resumed, expected = metric_history(store(killed)), metric_history(store(straight))
    for key in CURVES:
        assert resumed[key] == expected[key], key  # every epoch once, bit for bit on the CPU
    assert len({value for _, value in expected["batch_size"]}) >= 2  # the kill fell across a batch-size change
    for name, tensor in final_weights(straight).items():
        assert torch.equal(tensor, final_weights(killed)[name]), name

"""experiments/lm: the seven methods of the paper's comparison and goodput for a small GPT with AdamW, at
CPU and at GPU scale: every spec validates, the methods differ only where they should, and a CPU spec trains."""
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from dbx.checks import check_spec_file
from dbx.cli import main

LM = Path(__file__).resolve().parent.parent / "experiments" / "lm"
METHODS = ("fixed_small", "fixed_large", "fixed_large_scaled", "adabatch", "adabatch_rescale", "divebatch",
           "divebatch_rescale")


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_every_method_validates_and_differs_only_in_batch_policy_and_lr_rule(scale):
    specs = {m: check_spec_file(str(LM / scale / f"{m}.yaml")) for m in METHODS}
    assert {p.stem for p in (LM / scale).glob("*.yaml")} == set(METHODS) | {"goodput"}
    small = specs["fixed_small"]
    b0 = small.policy.params["batch_size"]
    b_max = specs["fixed_large"].policy.params["batch_size"]
    assert b_max == 16 * b0  # the paper's ratio
    for method, spec in specs.items():
        assert spec.optimizer.name == "adamw" and spec.clip_grad_norm == 1.0, method
        assert spec.model == small.model and spec.data == small.data and spec.epochs == small.epochs, method
        assert spec.lr_scaling == ("auto" if method.endswith("_rescale") else "none"), method
        expected_lr = small.optimizer.base_lr * (math.sqrt(b_max / b0) if method == "fixed_large_scaled" else 1)
        assert spec.optimizer.base_lr == pytest.approx(expected_lr), method
        assert spec.tracking.experiment == f"lm-{scale}" and spec.sweep == {"seed": [0, 1, 2]}, method
    goodput = check_spec_file(str(LM / scale / "goodput.yaml"))
    assert goodput.model == small.model and goodput.data == small.data and goodput.optimizer == small.optimizer
    assert goodput.policy.params["initial"] == b0 and goodput.policy.params["max"] == b_max
    assert goodput.estimator.name == "subsampled"  # the noise scale at one point (README, "Goodput")
    for method in ("adabatch", "divebatch"):
        assert specs[method].policy.params["initial"] == b0 and specs[method].policy.params["max"] == b_max
        assert specs[f"{method}_rescale"].policy == specs[method].policy


@pytest.mark.slow
def test_the_cpu_divebatch_spec_trains_end_to_end_on_a_slice_of_the_corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["run", str(LM / "cpu" / "divebatch.yaml"), "--device", "cpu",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    for override in ("epochs=2", "data.params.max_bytes=12000", "sweep.seed=[0]", "tracking.system_metrics=false",
                     "model.params.width=16", "model.params.heads=1", "model.params.depth=1"):
        args += ["--set", override]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "ppl" in result.output and "diversity" in result.output

"""The paper's specs (experiments/cifar10, cifar100, tiny_imagenet) and their CPU-scale versions
(experiments/cpu) pass `dbx validate`, carry the paper's hyper-parameters (docs/algorithm.md), and a CPU spec trains
end to end on a tiny MNIST written in the real IDX format."""
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dbx.checks import check_spec_file
from dbx.cli import main

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
FOLDERS = ("cifar10", "cifar100", "tiny_imagenet", "cpu")
METHODS = ("sgd_small", "sgd_large", "sgd_large_scaled", "adabatch", "adabatch_rescale", "divebatch",
           "divebatch_rescale")
SPECS = sorted(p for folder in FOLDERS for p in (EXPERIMENTS / folder).glob("*.yaml"))


def test_every_method_has_a_spec_in_every_folder():
    for folder in FOLDERS:
        assert {p.stem for p in (EXPERIMENTS / folder).glob("*.yaml")} >= set(METHODS), folder


@pytest.mark.parametrize("path", SPECS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_spec_is_valid(path):
    spec = check_spec_file(str(path))
    assert spec.sweep == {"seed": [0, 1, 2, 3, 4]} or path.parent.name == "cpu"


# docs/algorithm.md, "The paper's experiments, as dbx specs": (B0, lr0, weight decay, schedule, epochs, delta, scaled lr)
SETUPS = {
    "cifar10": (128, 0.1, 5e-4, ("cosine", 200), 200, 0.1, 1.6),
    "cifar100": (128, 0.1, 5e-4, ("multistep", [60, 120, 160], 0.2), 200, 0.01, 1.6),
    "tiny_imagenet": (256, 0.01, 1e-4, ("step", 30, 0.1), 90, 0.01, 0.16),
}


def schedule_of(spec):
    s = spec.schedule
    return {"cosine": (s.name, s.t_max), "multistep": (s.name, s.milestones, s.gamma),
            "step": (s.name, s.step_size, s.gamma)}[s.name]


@pytest.mark.parametrize("folder", sorted(SETUPS))
def test_paper_hyper_parameters(folder):
    b0, lr, wd, schedule, epochs, delta, scaled_lr = SETUPS[folder]
    specs = {m: check_spec_file(str(EXPERIMENTS / folder / f"{m}.yaml")) for m in METHODS}
    for method, spec in specs.items():
        assert spec.optimizer.momentum == 0.9 and spec.optimizer.weight_decay == wd, method
        assert schedule_of(spec) == schedule and spec.epochs == epochs, method
        assert spec.optimizer.lr == (scaled_lr if method == "sgd_large_scaled" else lr), method
        assert spec.lr_scaling == ("linear" if method.endswith("_rescale") else "none"), method
    assert specs["sgd_small"].policy.params == {"batch_size": b0}
    assert specs["sgd_large"].policy.params == {"batch_size": 2048}
    assert specs["adabatch"].policy.params == {"initial": b0, "max": 2048, "every": 20, "factor": 2, "lr_decay": 1.0}
    assert specs["divebatch"].policy.params == {"initial": b0, "max": 2048, "delta": delta, "resize_every": 20}
    assert specs["divebatch_rescale"].policy.params == specs["divebatch"].policy.params


def write_idx(path, array):
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.mark.slow
def test_a_cpu_spec_trains_end_to_end_on_tiny_mnist(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 96), ("t10k", 32)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DBX_DATA_ROOT", str(tmp_path / "data"))
    overrides = ["epochs=2", "data.subset=64", "sweep.seed=[0]", "tracking.system_metrics=false",
                 "policy.params.resize_every=1", "policy.params.initial=16", "policy.params.max=64"]
    args = ["run", str(EXPERIMENTS / "cpu" / "divebatch.yaml"), "--device", "cpu",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    for o in overrides:
        args += ["--set", o]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "epoch  2/2" in result.output or "epoch 2/2" in result.output

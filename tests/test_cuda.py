"""What only a CUDA device can show: the estimator's numbers there, that a measuring step never
waits for the device, and `dbx run` on a GPU in every precision. Skipped without CUDA; run them
on a GPU machine with ``pytest tests/test_cuda.py`` (benchmarks/gpu_check.sh does, with the rest)."""
import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_data_images import write_cifar10
from torch import nn

from dbx.cli import main
from dbx.estimators import ExactEstimator, per_sample_sq_norms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def exact_float32():
    """cuDNN and cuBLAS use TF32 by default on Ampere and later (10 mantissa bits): compare in float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))


@pytest.mark.parametrize("form", ["auto", "ghost", "explicit"])
def test_exact_norms_on_cuda_match_the_cpu_with_cudnn_batchnorm(exact_float32, form):
    model = conv_net().train()
    x, y = torch.randn(24, 3, 16, 16), torch.randint(0, 10, (24,))
    on_cpu = per_sample_sq_norms(copy.deepcopy(model), F.cross_entropy, x, y, form=form)
    on_gpu = per_sample_sq_norms(copy.deepcopy(model).cuda(), F.cross_entropy, x.cuda(), y.cuda(), form=form)
    assert set(on_gpu.per_layer) == set(on_cpu.per_layer)
    for path, expected in on_cpu.per_layer.items():
        torch.testing.assert_close(on_gpu.per_layer[path].cpu(), expected, rtol=1e-4, atol=1e-7, msg=path)


@contextlib.contextmanager
def no_synchronisation(enabled: bool = True):
    """Any operation that waits for the device raises inside this block."""
    torch.cuda.set_sync_debug_mode("error" if enabled else "default")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def train_steps(model, estimator, batches, *, amp=None, check: bool = False):
    """Training steps with the estimator measuring; with ``check``, everything but the optimizer's
    step must run without waiting for the device (the GradScaler's own step reads its overflow
    flag, by design)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    for x, y in batches:
        with no_synchronisation(check):
            with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
                out = model(x)
            loss = F.cross_entropy(out.float(), y, reduction="sum")
            loss_scale = 1.0 / len(x)
            if scaler is not None:
                scale = scaler._get_scale_async()
                grad_scale = scale if scale is not None else torch.full((), scaler.get_scale(), device="cuda")
                scaler.scale(loss * loss_scale).backward()
                loss_scale = loss_scale * grad_scale
            else:
                (loss * loss_scale).backward()
            estimator.on_backward(loss_scale)
            estimator.on_step(loss_scale)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_measuring_steps_on_cuda_never_wait_for_the_device(amp):
    model = conv_net().cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [(torch.randn(32, 3, 16, 16, device="cuda", generator=g),
                torch.randint(0, 10, (32,), device="cuda", generator=g)) for _ in range(4)]
    estimator = ExactEstimator()
    estimator.attach(model)
    train_steps(model, estimator, batches[:1], amp=amp)  # lazy initialisation may synchronise once
    torch.cuda.synchronize()
    train_steps(model, estimator, batches[1:], amp=amp, check=True)
    result = estimator.estimate(model, F.cross_entropy, None)
    estimator.detach()
    # fp16: the GradScaler's first steps may overflow; the estimator leaves them out
    assert result.samples == 128 or (amp == torch.float16 and 0 < result.samples < 128), result.samples
    assert 0 < result.value < float("inf")


def synchronisations(work) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


SPEC = """\
name: gpu
seed: 0
device: cuda
data: {{name: cifar10, root: {root}, params: {{augment: true}}}}
model: {{name: resnet18_cifar}}
optimizer: {{lr: 0.05, momentum: 0.9, weight_decay: 5e-4}}
epochs: 3
amp: {amp}
policy: {{name: divebatch, params: {{initial: {initial}, max: 256, delta: 0.5, resize_every: 1}}}}
estimator: {{name: exact}}
tracking: {{system_metrics: false}}
"""


def test_a_measuring_epoch_synchronises_a_fixed_number_of_times_whatever_its_steps(tmp_path):
    from dbx.spec import load_spec
    from dbx.train.loop import train_one_epoch
    from dbx.train.parts import build_parts

    write_cifar10(tmp_path / "data", per_batch=64)  # 320 training images

    def epoch_with(batch_size: int):
        path = tmp_path / f"b{batch_size}.yaml"
        path.write_text(SPEC.format(root=tmp_path / "data", amp="none", initial=batch_size))
        spec = load_spec(path)
        parts = build_parts(spec, torch.device("cuda"))
        parts.train_loader.set_batch_size(batch_size)
        parts.estimator.attach(parts.model)
        train_one_epoch(parts, None, parts.estimator, lambda: None)  # warm-up: lazy initialisation
        torch.cuda.synchronize()
        count = synchronisations(lambda: train_one_epoch(parts, None, parts.estimator, lambda: None))
        parts.estimator.detach()
        return count

    few, many = epoch_with(160), epoch_with(16)  # 2 steps against 20
    assert few == many, f"{many - few} more synchronisations in 18 more steps: something in the step waits"


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_dbx_run_trains_on_cuda_in_every_precision(tmp_path, monkeypatch, amp):
    from mlflow import MlflowClient

    write_cifar10(tmp_path / "data", per_batch=64)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = tmp_path / "gpu.yaml"
    spec.write_text(SPEC.format(root=tmp_path / "data", amp=amp, initial=32))
    result = CliRunner().invoke(main, ["run", str(spec)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert "cuda" in run.data.tags["device"]
    diversity = [m.value for m in client.get_metric_history(run.info.run_id, "diversity")]
    assert diversity and all(0 < d < float("inf") for d in diversity), diversity


GRAPHS_BASE = {
    "name": "graphs", "seed": 0, "device": "cuda", "epochs": 3, "eval_batch_size": 256,
    "data": {"name": "synthetic_logistic", "params": {"n": 1000, "d": 32}},  # 800 training samples
    "model": {"name": "mlp", "params": {"widths": [64, 64]}},
    "optimizer": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    "schedule": {"name": "cosine"},  # a new lr every epoch: every graph is captured anew
    "policy": {"name": "fixed", "params": {"batch_size": 96}},  # 8 batches of 96, one of 32
    "clip_grad_norm": 5.0,
    "checkpoint": {"enabled": False}, "tracking": {"system_metrics": False},
}


class Recorder:
    def __init__(self):
        self.epochs = []

    def log_epoch(self, epoch, metrics):
        self.epochs.append(metrics)


def graphs_run(**extra):
    from dbx.spec import spec_from_dict
    from dbx.train.loop import fit
    from dbx.train.parts import build_parts

    spec = spec_from_dict({**GRAPHS_BASE, **extra})
    parts = build_parts(spec, torch.device("cuda"))
    recorder, lines = Recorder(), []
    fit(spec, parts, recorder, say=lines.append)
    return recorder.epochs, [p.detach().cpu() for p in parts.model.parameters()], lines


@pytest.mark.parametrize("extra", [{}, {"optimizer": {"name": "adamw", "lr": 1e-3}},
                                   # epoch 2 measures eagerly between graphed epochs 1 and 3
                                   {"policy": {"name": "divebatch", "params": {"initial": 96, "max": 384,
                                                                              "resize_every": 2}}},
                                   {"max_micro_batch": 48}],
                         ids=["sgd", "adamw-capturable", "measuring-epochs", "micro-batches"])
def test_cuda_graphs_train_the_eager_runs_curves(exact_float32, extra):
    eager, eager_weights, _ = graphs_run(**extra)
    graphed, weights, lines = graphs_run(cuda_graphs=True, **extra)
    assert not any(line.startswith("cuda_graphs") for line in lines), lines  # captured, no fallback
    keys = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "batch_size", "grad_norm", "diversity")
    for epoch, (got, want) in enumerate(zip(graphed, eager), start=1):
        for key in keys:
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), f"epoch {epoch} {key}"
    for got, want in zip(weights, eager_weights):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cuda_graphs_capture_one_graph_per_batch_shape_and_replay_it():
    from dbx.spec import spec_from_dict
    from dbx.train.cuda_graphs import StepGraphs
    from dbx.train.loop import train_one_epoch
    from dbx.train.parts import build_parts

    spec = spec_from_dict({**GRAPHS_BASE, "cuda_graphs": True})
    parts = build_parts(spec, torch.device("cuda"))
    graphs = StepGraphs(parts, max_micro_batch=None)
    train_one_epoch(parts, None, None, lambda: None, graphs=graphs)  # the first epoch captures
    assert not graphs.failed and len(graphs._graphs) == 2  # B = 96 and the last batch of 32
    captured = dict(graphs._graphs)
    torch.cuda.synchronize()
    replayed = synchronisations(lambda: train_one_epoch(parts, None, None, lambda: None, graphs=graphs))
    assert graphs._graphs == captured  # same lr: replayed, not captured again
    eager = synchronisations(lambda: train_one_epoch(parts, None, None, lambda: None))
    assert replayed <= eager, (replayed, eager)  # replaying waits for the device no more than eager steps


class Syncing(torch.nn.Module):
    """A model whose forward reads a value on the host: it cannot be captured."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(32, 2)

    def forward(self, x):
        if x.abs().max().item() > 1e9:
            x = x.clamp(-1e9, 1e9)
        return self.linear(x)


def test_a_step_that_cannot_be_captured_trains_without_graphs_and_says_so():
    from dbx.spec import spec_from_dict
    from dbx.train.cuda_graphs import StepGraphs
    from dbx.train.loop import train_one_epoch
    from dbx.train.parts import build_parts

    results = []
    for graphed in (False, True):
        spec = spec_from_dict(GRAPHS_BASE)
        parts = build_parts(spec, torch.device("cuda"))
        torch.manual_seed(0)
        parts.model = Syncing().cuda()
        parts.optimizer = torch.optim.SGD(parts.model.parameters(), lr=0.1)
        lines = []
        graphs = StepGraphs(parts, max_micro_batch=None, say=lines.append) if graphed else None
        trained = [train_one_epoch(parts, None, None, lambda: None, graphs=graphs) for _ in range(2)]
        results.append((trained, lines, graphs))
    (eager, _, _), (fallback, lines, graphs) = results
    assert graphs.failed and len(lines) == 1 and "could not be captured" in lines[0], lines
    assert [t.loss for t in fallback] == pytest.approx([t.loss for t in eager], rel=1e-5)


def test_cuda_graphs_with_fp16_train_eagerly_and_say_why():
    _, _, lines = graphs_run(cuda_graphs=True, amp="fp16", epochs=1)
    assert any("training without CUDA graphs: amp: fp16" in line for line in lines), lines

"""The measuring step's operation count, and the CUDA code path's numbers, checked on the CPU.

``kernel_path="cuda"`` runs the estimator's GPU layout (layers of equal shapes computed together,
their inputs and output gradients held until the end of the backward) on whatever device the
model is on, so both what it costs in dispatched operations (each one a kernel launch on a GPU)
and what it computes are tested here without a GPU. Counts, not times: they cannot flake.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dbx import registry
from dbx.estimators import ExactEstimator, per_sample_grads_func
from dbx.estimators.opcount import OpCounter
from dbx.models.resnet import resnet18_cifar


def training_step(model, optimizer, x, y, estimator=None, micro_batches=1):
    """One SGD step as dbx's loop takes it: mean loss per micro-batch share, backward, report, step."""
    batch = x.shape[0]
    for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
        loss = F.cross_entropy(model(xs), ys, reduction="sum") / batch
        loss.backward()
        if estimator is not None:
            estimator.on_backward(1.0 / batch)
    if estimator is not None:
        estimator.on_step(1.0 / batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ops_of_one_step(model, x, y, estimator=None) -> int:
    """Operations dispatched by one training step (forward, loss, backward, the estimator's calls,
    SGD with momentum, zero_grad), after two untimed steps (optimizer state and caches exist)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if estimator is not None:
        estimator.attach(model)
    for _ in range(2):
        training_step(model, optimizer, x, y, estimator)
    with OpCounter() as ops:
        training_step(model, optimizer, x, y, estimator)
    return ops.total


def test_cuda_path_measuring_step_dispatches_at_most_twice_the_ops_of_a_plain_step():
    # CIFAR ResNet-18 at B = 8: the same layer structure (and the same op count per layer) as at
    # B = 128, where on a GPU each operation is a launch the step waits for
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    model = resnet18_cifar(num_classes=10, input_shape=(3, 32, 32))
    plain = ops_of_one_step(copy.deepcopy(model), x, y)
    cuda_path = ops_of_one_step(copy.deepcopy(model), x, y, ExactEstimator(kernel_path="cuda"))
    cpu_path = ops_of_one_step(copy.deepcopy(model), x, y, ExactEstimator(kernel_path="cpu"))
    assert cuda_path <= 2 * plain, f"measuring step {cuda_path} ops, plain step {plain}"
    assert cuda_path < cpu_path  # the layers of equal shapes were computed together


class SmallConvNet(nn.Module):
    """Stages of equal convolutions (groups; "same" padding too), strided 3x3 and 1x1 convolutions,
    biases, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage1 = nn.ModuleList(nn.Conv2d(8, 8, 3, padding="same", bias=False) for _ in range(3))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.down2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.stage3 = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1) for _ in range(2))  # 2x2: Gram form
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for conv in self.stage1:
            x = F.relu(conv(x)) + x
        x = F.relu(self.down(x) + self.shortcut(x))
        x = F.relu(self.down2(x))
        for conv in self.stage3:
            x = torch.tanh(conv(x)) + x
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("fuse", [True, False])
def test_cuda_path_equals_a_torch_func_oracle_and_leaves_training_unchanged(fuse):
    torch.manual_seed(0)
    model = SmallConvNet().double()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y, reduction="sum").backward()
    per_sample = per_sample_grads_func(model, F.cross_entropy, x, y)

    estimator = ExactEstimator(kernel_path="cuda", per_layer=True, fuse_weight_grads=fuse)
    estimator.attach(model)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    estimator.on_backward(1.0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)  # fused or not
    estimator.on_step(1.0)
    result = estimator.estimate(model, F.cross_entropy, None)
    estimator.detach()

    sum_sq = sum(float(g.flatten(1).square().sum()) for g in per_sample.values())
    sq_of_sum = sum(float(g.sum(0).square().sum()) for g in per_sample.values())
    assert result.samples == 6
    assert result.sum_sq_norms == pytest.approx(sum_sq, rel=1e-10)
    assert result.value == pytest.approx(sum_sq / sq_of_sum, rel=1e-6)  # the summed gradient is kept in float32
    for layer, value in result.per_layer.items():
        grads = [g for n, g in per_sample.items() if n.rsplit(".", 1)[0] == layer]
        expected = sum(float(g.flatten(1).square().sum()) for g in grads) / sum(
            float(g.sum(0).square().sum()) for g in grads)
        assert value == pytest.approx(expected, rel=1e-6), layer


class Mixed(nn.Module):
    """What the grouped path must leave to the per-layer kernels: a module called twice, an
    eval-mode BatchNorm (running statistics), a bias-free BatchNorm; beside two equal BatchNorms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        self.frozen = nn.BatchNorm2d(6)
        self.twice = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn_a(self.conv(x)))
        x = self.twice(F.relu(self.twice(x)))
        x = self.frozen(F.relu(self.bn_b(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("build, params", [
    (lambda: resnet18_cifar(num_classes=10, input_shape=(3, 16, 16)), {}),
    (lambda: Mixed(), {}),
    (lambda: Mixed(), {"weighting": "authors"}),  # BatchNorm terms from running statistics: not grouped
    (lambda: Mixed(), {"fallback_force": ["conv"]}),  # a convolution measured by the fallback: not grouped
], ids=["resnet18_cifar", "mixed", "mixed-authors", "mixed-fallback"])
def test_cuda_path_equals_cpu_path_with_batchnorm_and_micro_batches(build, params):
    torch.manual_seed(0)
    model = build()
    if isinstance(model, Mixed):
        model.frozen.eval()
        model.frozen.bias.requires_grad_(False)
    results, weights = {}, {}
    for path in ("cpu", "cuda"):
        torch.manual_seed(1)
        trained = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9)
        estimator = ExactEstimator(kernel_path=path, per_layer=True, **params)
        estimator.attach(trained)
        for _ in range(3):
            x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
            training_step(trained, optimizer, x, y, estimator, micro_batches=2)
        results[path] = estimator.estimate(trained, F.cross_entropy, None)
        weights[path] = [p.detach() for p in trained.parameters()]
    cpu, cuda = results["cpu"], results["cuda"]
    assert cuda.samples == cpu.samples == 24
    assert cuda.sum_sq_norms == pytest.approx(cpu.sum_sq_norms, rel=1e-5)
    assert cuda.sq_norm_of_sum == pytest.approx(cpu.sq_norm_of_sum, rel=1e-5)
    assert cuda.per_layer == pytest.approx(cpu.per_layer, rel=1e-5)
    for a, b in zip(weights["cpu"], weights["cuda"], strict=True):  # the same training
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_path_must_be_a_known_path():
    problems = registry.check_params("estimator", "exact", {"kernel_path": "tpu"})  # what dbx validate reports
    assert [key for key, _ in problems] == [("kernel_path",)] and "'cuda'" in problems[0][1]
    assert registry.check_params("estimator", "layerwise", {"kernel_path": "cuda"}) == []
    with pytest.raises(ValueError, match="kernel_path"):
        ExactEstimator(kernel_path="tpu")
    from dbx.estimators import LayerwiseEstimator

    assert LayerwiseEstimator(kernel_path="cuda").kernel_path == "cuda"

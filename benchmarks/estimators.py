"""What a measuring step costs: dbx's ``exact`` estimator against the other ways to get per-sample norms.

For a CIFAR-shaped ResNet-18 (3x3 stem, no max-pool; dbx's ``resnet18_cifar``) and an MLP, at
B = 32 and 128, each method runs the same training steps (SGD with momentum, cross-entropy) on the
same model and data, and the table shows its step time and peak memory as ratios to a plain
training step measured in the same run:

- ``plain``: forward, backward, optimizer step; no statistic;
- ``exact``: dbx's ``exact`` estimator (layer hooks on the step's own backward);
- ``vmap``: the plain step plus per-sample gradients from ``torch.func.vmap(grad(...))`` in chunks
  of samples (an extra forward and backward per sample; BatchNorm runs per sample);
- ``backpack``: BackPACK's ``BatchL2Grad`` on the step's backward, with BatchNorm switched to eval
  mode for the backward as the DiveBatch authors did (extra ``bench``: ``pip install .[bench]``);
- ``opacus``: Opacus' ``GradSampleModule`` (per-sample gradients stored), norms from them.

Every method keeps the running sums an epoch's statistic needs (of the norms and of the gradient),
as ``exact`` does. It also reports the batch's gradient diversity from each method at the first step (same weights,
same batch): all must agree on the model without BatchNorm (the MLP); with BatchNorm the methods
define "per-sample gradient" differently, and the table shows by how much they differ from dbx.

Times are measured side by side: in one process, a plain runner and the method's runner (same
initial weights, same data) take steps in turn, the order swapped every pair, and "x plain" is the
median of the pairs' ratios, so that the shared machine's changing load hits both alike. On CPU
they are the process's CPU seconds per step with one thread by default; ``--threads 0`` uses
torch's default and ``--wall`` reports wall-clock time. Peak memory comes from a fresh process per
(model, batch size, method) (on CPU: the peak resident memory above what the process held after a
throw-away step of the same method at batch 2, i.e. parameters, gradients, optimizer state,
activations and scratch, read from Linux's high-water mark after a reset; on CUDA:
``torch.cuda.max_memory_allocated``), of the second step; exact's first step, which runs its
self-check, is shown on a line of its own (time and peak memory). ``--forms`` adds the per-convolution timings of the explicit
and Gram forms that calibrate the estimator's choice between them; ``--layers`` adds, per layer of
the ResNet-18, where the measuring step's extra time goes in context.

    python benchmarks/estimators.py                    # the default table (~4 min on 2 CPU cores)
    python benchmarks/estimators.py --steps 10 --other-steps 3 --device cuda --batch-sizes 32,128,512 --forms
    python benchmarks/estimators.py --models mlp --methods plain,exact,vmap
    python benchmarks/estimators.py --models resnet18 --batch-sizes 128 --methods plain,exact --layers
    python benchmarks/estimators.py --ops              # dispatched operations per step, both code paths

``--ops`` counts instead of timing: the operations one plain and one measuring step dispatch, on
the CPU and the CUDA kernel code path (the estimator's ``kernel_path``), per part of the step and
per layer or group of layers, and the host time spent in the hooks.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from typing import Any

METHODS = ("plain", "exact", "vmap", "backpack", "opacus")
MODELS = ("resnet18", "mlp", "gpt", "lstm")
#: the sequence models' shapes: a GPT block stack at sequence 128, an LSTM classifier over 64 steps
GPT = {"vocab": 256, "width": 128, "heads": 4, "depth": 2, "length": 128}
LSTM = {"features": 32, "hidden": 128, "length": 64, "classes": 10}


def _gpt():
    import torch
    from torch import nn

    class Model(nn.Module):
        def __init__(self, vocab, width, heads, depth, length):
            super().__init__()
            self.tokens = nn.Embedding(vocab, width)
            self.positions = nn.Embedding(length, width)
            self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                                                   activation="gelu", batch_first=True,
                                                                   norm_first=True) for _ in range(depth))
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, vocab)

        def forward(self, idx):
            t = idx.shape[1]
            x = self.tokens(idx) + self.positions(torch.arange(t, device=idx.device).expand_as(idx))
            mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
            for block in self.blocks:
                x = block(x, src_mask=mask, is_causal=True)
            return self.head(self.norm(x))

    return Model(**GPT)


def _lstm():
    from dbx.models.recurrent import lstm_classifier

    return lstm_classifier(num_classes=LSTM["classes"], input_shape=(LSTM["length"], LSTM["features"]),
                           hidden=LSTM["hidden"])


def loss_for(model_name: str):
    """The loss as dbx calls it, ``loss_fn(outputs, targets, reduction="sum")``: per token for the GPT."""
    import torch.nn.functional as F

    if model_name == "gpt":
        return lambda out, y, reduction="sum": F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction=reduction)
    return F.cross_entropy


# ----------------------------------------------------------------------------------------------
# One measurement (runs in its own process)
# ----------------------------------------------------------------------------------------------


def build_model(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)  # same initial weights for every method
    if name == "gpt":  # embeddings, TransformerEncoderLayer blocks (causal, pre-norm, no dropout), untied head
        return _gpt()
    if name == "lstm":  # dbx's lstm_classifier over (T, F) sequences
        return _lstm()
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                             nn.Linear(512, 10))
    try:
        from dbx.models.resnet import resnet18_cifar

        return resnet18_cifar(num_classes=10, input_shape=(3, 32, 32))
    except ImportError:  # dbx's model zoo not there: the same network from torchvision
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
        model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> int:
    """Return freed memory to the OS, reset the kernel's resident-memory high-water mark, and
    return the resident bytes now (Linux; elsewhere the process's lifetime peak is used)."""
    import ctypes
    import gc
    import resource

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return (_status_kib("VmRSS") or 0) * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    import resource

    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Method:
    """Set up once; then ``step_<name>()`` is one training step with the statistic. ``diversity``
    is the first step's batch diversity sum_i ||g_i||^2 / ||sum_i g_i||^2 by this method."""

    def __init__(self, name, model, loss_fn, x, y, device):
        import torch

        self.name, self.model, self.loss_fn, self.x, self.y = name, model, loss_fn, x, y
        self.batch = x.shape[0]
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.diversity: float | None = None
        getattr(self, f"setup_{name}")()

    # -- helpers --------------------------------------------------------------------------------
    def forward_backward(self, model=None):
        loss = self.loss_fn((model or self.model)(self.x), self.y, reduction="sum") / self.batch
        loss.backward()

    def finish(self, sq_norms=None):
        """The optimizer step; for the other methods first what an epoch statistic needs beside the
        per-sample norms, as ``exact`` does it: running sums of the norms and of the gradient."""
        import torch

        if sq_norms is not None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if self.diversity is None:  # per-sample norms of the unscaled losses
                grad_sq = sum(g.double().square().sum() for g in grads)
                self.diversity = float(sq_norms.double().sum() / (grad_sq * self.batch ** 2))
                self.sum_sq = torch.zeros((), dtype=torch.float64, device=grads[0].device)
                self.sum_grad = [torch.zeros_like(g, dtype=torch.float32) for g in grads]
            self.sum_sq += sq_norms.sum()
            torch._foreach_add_(self.sum_grad, grads, alpha=float(self.batch))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    # -- plain ------------------------------------------------------------------------------------
    def setup_plain(self):
        pass

    def step_plain(self):
        self.forward_backward()
        self.finish()

    # -- dbx exact --------------------------------------------------------------------------------
    def setup_exact(self):
        from dbx.estimators import ExactEstimator

        self.estimator = ExactEstimator()
        self.estimator.attach(self.model)
        self.steps = 0

    def step_exact(self):
        self.forward_backward()
        self.estimator.on_backward(1.0 / self.batch)
        self.estimator.on_step(1.0 / self.batch)
        self.steps += 1
        if self.steps == 1:  # the first step's batch diversity, for the agreement check
            self.diversity = self.estimator.estimate(self.model, self.loss_fn, None).value
        self.finish()

    # -- torch.func -------------------------------------------------------------------------------
    def setup_vmap(self):
        import copy

        from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

        per_sample_model = replace_all_batch_norm_modules_(copy.deepcopy(self.model))  # no running stats
        buffers = dict(per_sample_model.named_buffers())
        loss_fn = self.loss_fn

        def one(params, x, y):
            out = functional_call(per_sample_model, (params, buffers), (x.unsqueeze(0),))
            return loss_fn(out, y.unsqueeze(0), reduction="sum")

        self.per_sample_grads = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")
        self.chunk = 16  # per-sample gradients of 16 samples at a time: memory stays bounded

    def step_vmap(self):
        import torch

        self.forward_backward()
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        sq = []
        for s in range(0, self.batch, self.chunk):
            grads = self.per_sample_grads(params, self.x[s:s + self.chunk], self.y[s:s + self.chunk])
            sq.append(sum(g.flatten(1).float().square().sum(1) for g in grads.values()))
        self.finish(torch.cat(sq))

    # -- BackPACK -----------------------------------------------------------------------------------
    def setup_backpack(self):
        from backpack import extend

        self.model = extend(self.model)
        self.bn = [m for m in self.model.modules() if "BatchNorm" in type(m).__name__]

    def step_backpack(self):
        from backpack import backpack
        from backpack.extensions import BatchL2Grad

        loss = self.loss_fn(self.model(self.x), self.y, reduction="sum") / self.batch
        for m in self.bn:  # as the DiveBatch authors: BatchNorm in eval mode for the backward
            m.eval()
        with backpack(BatchL2Grad()):
            loss.backward()
        for m in self.bn:
            m.train()
        sq = sum(p.batch_l2 for p in self.model.parameters()) * self.batch ** 2
        self.finish(sq)

    # -- Opacus ---------------------------------------------------------------------------------------
    def setup_opacus(self):
        from opacus import GradSampleModule

        self.wrapped = GradSampleModule(self.model, loss_reduction="sum", strict=False)

    def step_opacus(self):
        self.forward_backward(self.wrapped)
        params = [p for p in self.model.parameters() if p.requires_grad]
        sq = sum(p.grad_sample.flatten(1).float().square().sum(1) for p in params) * self.batch ** 2
        for p in params:
            p.grad_sample = None
        self.finish(sq)


def warm_up(model_name: str, method: str, device: str) -> None:
    """One step of the same method on a throw-away copy at batch 2: lazy imports (the optimizer
    alone pulls in ~150 MB of modules) and backend initialisation are not the method's memory."""
    x, y = make_batch(2, device, model_name)
    runner = Method(method, build_model(model_name).to(device), loss_for(model_name), x, y, device)
    getattr(runner, f"step_{method}")()
    if method == "exact":
        runner.estimator.detach()


def make_batch(batch: int, device: str, model_name: str = "resnet18"):
    import torch

    g = torch.Generator().manual_seed(1)
    if model_name == "gpt":
        tokens = torch.randint(0, GPT["vocab"], (batch, GPT["length"] + 1), generator=g).to(device)
        return tokens[:, :-1], tokens[:, 1:]
    if model_name == "lstm":
        x = torch.randn(batch, LSTM["length"], LSTM["features"], generator=g).to(device)
        return x, torch.randint(0, LSTM["classes"], (batch,), generator=g).to(device)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return x, y


def measure_memory(model_name: str, batch: int, method: str, device: str, threads: int) -> dict[str, Any]:
    """Peak memory of two steps of ``method`` alone in this process, and its first-step diversity."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    warm_up(model_name, method, device)
    baseline = reset_peak_rss()
    x, y = make_batch(batch, device, model_name)
    runner = Method(method, build_model(model_name).to(device), loss_for(model_name), x, y, device)
    step = getattr(runner, f"step_{method}")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step()  # exact's first step carries the self-check
    if cuda:
        torch.cuda.synchronize()
    first = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes() - baseline
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()  # the high-water mark of the second step alone (against the same baseline)
    step()
    if cuda:
        torch.cuda.synchronize()
    second = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes() - baseline
    return {"peak_bytes": second, "check_peak_bytes": first, "diversity": runner.diversity}


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (as jemalloc and
    tcmalloc do). By default every large tensor is a fresh mmap whose pages fault in zeroed: on
    CPU that is 15-20% of a plain ResNet-18 step, as system time."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: large blocks come from the heap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: and stay there when freed


def measure_time(model_name: str, batch: int, method: str, device: str, warmup: int, steps: int, threads: int,
                 wall: bool) -> dict[str, Any]:
    """Steps of a plain runner and a ``method`` runner (same initial weights and data) in turn, the
    order swapped every pair, so that a change in the machine's load hits both alike; the ratio is
    the median of the pairs' ratios."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    x, y = make_batch(batch, device, model_name)
    runners = {name: Method(name, build_model(model_name).to(device), loss_for(model_name), x, y, device)
               for name in ("plain", method)}

    def timed(name: str) -> float:
        if cuda:
            torch.cuda.synchronize()
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        getattr(runners[name], f"step_{name}")()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start_wall) if (wall or cuda) else (time.process_time() - start_cpu)

    first = None  # exact's first step carries the self-check (once per measuring epoch)
    for _ in range(warmup):
        plain_first, other_first = timed("plain"), timed(method)
        first = other_first / plain_first if first is None else first
    pairs: list[tuple[float, float]] = []
    # at least `steps` pairs, and more (up to 200) until they add up to a second
    while len(pairs) < steps or (sum(a + b for a, b in pairs) < 1.0 and len(pairs) < 200):
        if len(pairs) % 2 == 0:
            plain = timed("plain")
            other = timed(method)
        else:
            other = timed(method)
            plain = timed("plain")
        pairs.append((plain, other))
    extra = {}
    if method == "exact":  # host time inside the hooks: on a GPU, launches the step waits for
        hooks = runners["exact"].estimator._hooks
        extra["hook_seconds_per_step"] = hooks.seconds / (warmup + len(pairs))
        extra["first_step_ratio"] = first
    return {
        **extra,
        "plain_seconds": statistics.median(p for p, _ in pairs),
        "seconds": statistics.median(o for _, o in pairs),
        "ratio": statistics.median(o / p for p, o in pairs),
        "pairs": pairs,
    }


def forms_table(device: str, batch: int, threads: int) -> None:
    """Per convolution of the CIFAR ResNet-18: the batch weight gradient, the explicit form and
    the Gram ("ghost") form, timed alone, with the form the cost model picks. The explicit form's
    extra cost when fused is (explicit - batch); ``FUSED_ELEMENT_MACS`` is calibrated from it."""
    import torch
    from torch import nn

    from dbx.estimators import kernels as K

    if threads > 0:
        torch.set_num_threads(threads)
    cuda = device.startswith("cuda")

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    shapes = [(64, 64, 32, 1, 3), (64, 128, 32, 2, 3), (64, 128, 32, 2, 1), (128, 128, 16, 1, 3),
              (128, 256, 16, 2, 3), (128, 256, 16, 2, 1), (256, 256, 8, 1, 3), (256, 512, 8, 2, 3),
              (256, 512, 8, 2, 1), (512, 512, 4, 1, 3)]
    print(f"\n# convolution forms, B={batch}, {device}: seconds per call (best of 3)")
    print(f"  {'conv':<22} {'batch':>8} {'explicit':>9} {'fused +':>8} {'ghost':>8}  picked  per-elem MACs")
    for c_in, c_out, hw, stride, k in shapes:
        conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False).to(device)
        x = torch.randn(batch, c_in, hw, hw, device=device)
        g = torch.randn(batch, c_out, hw // stride, hw // stride, device=device)
        t_batch = best(partial(torch.nn.grad.conv2d_weight, x, conv.weight.shape, g, stride=stride, padding=k // 2))
        t_explicit = best(partial(K._conv_explicit, conv, [x], [g], [False]))
        t_ghost = best(partial(K._conv_ghost, conv, x, g))
        costs = K.conv_forms_cost(conv, x.shape[2:], device_type=x.device.type)
        # the per-element cost at which fused explicit and ghost would tie, from the timings
        per_elem = costs["ghost"] * (t_explicit - t_batch) / t_ghost / (c_in * c_out * k * k)
        name = f"{c_in}->{c_out} {hw}px s{stride} k{k}"
        print(f"  {name:<22} {t_batch:8.4f} {t_explicit:9.4f} {t_explicit - t_batch:+8.4f} {t_ghost:8.4f}  "
              f"{K._conv_plan(conv, x, 'auto', fused=True):<8}{per_elem:7.0f}")


def layers_table(device: str, batch: int, threads: int, steps: int) -> None:
    """Where the measuring step's extra time goes, layer by layer, in context (ResNet-18).

    Plain and exact steps alternate. For every parameter-owning module: the time of its backward
    node in plain steps, the same node in exact steps (a fused layer's node no longer computes the
    weight gradient), and exact's hook for the layer (per-sample norms, and a fused layer's weight
    gradient, which runs before the node); extra = exact node + hook - plain node. On CPU these are
    the thread's CPU seconds; on CUDA, host seconds without synchronisation: what a launch-bound
    step waits for. The forward hooks, the running sums and the optimizer are not in the table.
    """
    import collections
    import types

    import torch
    import torch.nn.functional as F

    if threads > 0:
        torch.set_num_threads(threads)
    clock = time.perf_counter if device.startswith("cuda") else time.thread_time
    x, y = make_batch(batch, device)
    runners = {name: Method(name, build_model("resnet18").to(device), F.cross_entropy, x, y, device)
               for name in ("plain", "exact")}
    node_seconds = {name: collections.defaultdict(float) for name in runners}
    hook_seconds: dict[str, float] = collections.defaultdict(float)
    kinds = {}
    for name, runner in runners.items():
        for path, module in runner.model.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                kinds[path] = type(module).__name__
                module.register_forward_hook(partial(_time_backward_node, node_seconds[name], path, clock))
    hooks = runners["exact"].estimator._hooks
    run = hooks._run

    def timed_run(self, layer, *args):
        start = clock()
        try:
            return run(layer, *args)
        finally:
            hook_seconds[layer.path] += clock() - start

    hooks._run = types.MethodType(timed_run, hooks)
    for _ in range(2):
        runners["plain"].step_plain(), runners["exact"].step_exact()
    for table in (*node_seconds.values(), hook_seconds):
        table.clear()
    for i in range(steps):
        for name in (("plain", "exact") if i % 2 == 0 else ("exact", "plain")):
            getattr(runners[name], f"step_{name}")()
    unit = "host ms" if device.startswith("cuda") else "CPU ms"
    print(f"\n# where the measuring step's extra time goes, resnet18, B={batch}, {device}, {unit} per step "
          f"(mean of {steps} alternating pairs)")
    print(f"  {'layer':<22} {'type':<12} {'plain node':>10} {'exact node':>10} {'hook':>8} {'extra':>8}")
    by_kind: dict[str, float] = collections.defaultdict(float)
    for path in node_seconds["plain"]:
        plain, exact = node_seconds["plain"][path] / steps * 1e3, node_seconds["exact"][path] / steps * 1e3
        hook = hook_seconds[path] / steps * 1e3
        by_kind[kinds[path]] += exact + hook - plain
        print(f"  {path:<22} {kinds[path]:<12} {plain:10.2f} {exact:10.2f} {hook:8.2f} {exact + hook - plain:+8.2f}")
    total = sum(by_kind.values())
    print("  extra by type: " + ", ".join(f"{kind} {ms:+.1f}" for kind, ms in sorted(by_kind.items()))
          + f"; all layers {total:+.1f} ms")


def ops_table(models: list[str], batches: list[int], threads: int, steps: int) -> None:
    """Dispatched operations per training step, plain and measuring, on both kernel code paths.

    Counted with a ``TorchDispatchMode`` (``dbx.estimators.opcount``): every operation that
    reaches the dispatcher, views included, in one step (forward, loss, backward, the estimator's
    ``on_backward`` and ``on_step``, SGD with momentum, ``zero_grad``) after two warm-up steps. On a
    GPU each non-view operation is a kernel launch of several microseconds, which a small step waits
    for; the count does not depend on the device, so ``kernel_path`` runs the CUDA layout here.
    "hooks ms" is the host time spent in the hooks per step (uncounted steps, ``perf_counter``); at
    B = 2 the arithmetic is negligible and it is about the hooks' Python and dispatch overhead.
    For the CUDA path of the largest batch, the operations of each layer's or group's norms follow.
    """
    import torch
    import torch.nn.functional as F

    from dbx.estimators import ExactEstimator
    from dbx.estimators import grouped as G
    from dbx.estimators.opcount import OpCounter

    if threads > 0:
        torch.set_num_threads(threads)

    def run(model_name: str, batch: int, path: str | None, labelled: bool = False):
        x, y = make_batch(batch, "cpu")
        runner = Method("plain", build_model(model_name), F.cross_entropy, x, y, "cpu")
        estimator = None
        if path is not None:
            estimator = ExactEstimator(kernel_path=path)
            estimator.attach(runner.model)

        def step(ops=None) -> None:
            label = ops.label if ops is not None else (lambda name: contextlib.nullcontext())
            with label("forward"):
                loss = runner.loss_fn(runner.model(x), y, reduction="sum") / batch
            with label("backward"):
                loss.backward()
            if estimator is not None:
                with label("estimator"):
                    estimator.on_backward(1.0 / batch)
                    estimator.on_step(1.0 / batch)
            with label("optimizer"):
                runner.opt.step()
                runner.opt.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        hook_ms = None
        if estimator is not None:
            before = estimator._hooks.seconds
            for _ in range(steps):
                step()
            hook_ms = (estimator._hooks.seconds - before) / steps * 1e3
        ops = OpCounter()
        restore = None
        if labelled and estimator is not None:
            hooks, grouped = estimator._hooks, G.grouped_sq_norms
            run_layer = hooks._run

            def layer_run(layer, *args):
                with ops.label(f"{layer.key} ({type(layer.module).__name__})"):
                    return run_layer(layer, *args)

            def group_run(modules, *args):
                names = [path for path, m in runner.model.named_modules() if any(m is k for k in modules)]
                with ops.label(f"{len(modules)} x {type(modules[0]).__name__}: {', '.join(names)}"):
                    return grouped(modules, *args)

            hooks._run, G.grouped_sq_norms = layer_run, group_run
            restore = lambda: (setattr(hooks, "_run", run_layer), setattr(G, "grouped_sq_norms", grouped))  # noqa: E731
        with ops:
            step(ops)
        if restore is not None:
            restore()
        return ops, hook_ms

    print("\n# dispatched operations per training step (TorchDispatchMode count; views included),"
          " plain and measuring (exact), per kernel code path")
    print(f"  {'model':<9} {'B':>5} {'plain':>6} {'path':>5} {'measuring':>9} {'x plain':>8} {'extra':>6}"
          f" {'hooks ms':>9} {'at B=2':>7}")
    for model_name in models:
        for batch in batches:
            plain, _ = run(model_name, batch, None)
            for path in ("cpu", "cuda"):
                ops, hook_ms = run(model_name, batch, path)
                _, small_ms = run(model_name, 2, path)
                print(f"  {model_name:<9} {batch:>5} {plain.total:>6} {path:>5} {ops.total:>9} "
                      f"{ops.total / plain.total:7.2f}x {ops.total - plain.total:>6} {hook_ms:9.2f} {small_ms:7.2f}")
    for model_name in models:
        batch = max(batches)
        plain, _ = run(model_name, batch, None)
        ops, _ = run(model_name, batch, "cuda", labelled=True)
        print(f"\n# {model_name}, B={batch}, CUDA path: operations by part of the step (plain step in brackets);"
              " the estimator's part is the layers' and groups' norms below and the sums")
        for part in ("forward", "backward", "estimator", "optimizer"):
            print(f"  {part:<10} {ops.by_label[part]:>5} ({plain.by_label[part]})")
        for label, count in ops.by_label.items():
            if label not in ("forward", "backward", "estimator", "optimizer"):
                print(f"    {count:>4}  {label}")


def _time_backward_node(seconds: dict[str, float], path: str, clock, module, args, output) -> None:
    """Add the time of ``output``'s backward node to ``seconds[path]`` when the backward runs it."""
    node = getattr(output, "grad_fn", None)
    if node is None:
        return
    started = []
    node.register_prehook(lambda grads: started.append(clock()))
    node.register_hook(lambda grad_inputs, grad_outputs: seconds.__setitem__(path, seconds[path] + clock() - started[-1]))


# ----------------------------------------------------------------------------------------------
# The table (parent process)
# ----------------------------------------------------------------------------------------------


def available(method: str) -> str | None:
    """None if the method can run here, else why not."""
    module = {"backpack": "backpack", "opacus": "opacus"}.get(method)
    if module is None:
        return None
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return "not installed (pip install .[bench])"
    return None


def run_child(args, *child: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *child, "--device", args.device, "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    if args.wall:
        cmd.append("--wall")
    if args.keep_freed_memory:
        cmd.append("--keep-freed-memory")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.timeout}s"}
    if out.returncode != 0:
        lines = [ln for ln in (out.stderr or out.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit {out.returncode}"
        if out.returncode < 0 or "MemoryError" in last or "Killed" in last:
            last = f"killed ({last})"
        return {"error": last[:90]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_row(args, model: str, batch: int, method: str) -> dict[str, Any]:
    """Memory in a process of its own; time side by side with plain steps in another."""
    memory = run_child(args, "--memory-child", model, str(batch), method)
    if "error" in memory or method == "plain":
        return memory
    steps = args.steps if method == "exact" else args.other_steps
    timing = run_child(args, "--time-child", model, str(batch), method, "--steps", str(steps))
    return {**memory, **timing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    parser.add_argument("--batch-sizes", default="32,128")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {METHODS}")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed (plain, exact) step pairs (medians are shown; short steps repeat to 1 s)")
    parser.add_argument("--other-steps", type=int, default=1, help="timed pairs for vmap, backpack and opacus")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU; 0 = torch's default")
    parser.add_argument("--wall", action="store_true", help="wall-clock instead of CPU time on CPU")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory (as with jemalloc/tcmalloc): no page-fault time in any step")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per (model, batch, method)")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--forms", action="store_true",
                        help="also time the convolution forms of the ResNet-18 at the largest batch size")
    parser.add_argument("--layers", action="store_true",
                        help="also show, per layer of the ResNet-18 at the largest batch size, where exact's extra time goes")
    parser.add_argument("--ops", action="store_true",
                        help="only count dispatched operations per plain and measuring step, on both kernel code paths")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--time-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.memory_child:
        model, batch, method = args.memory_child
        print(json.dumps(measure_memory(model, int(batch), method, args.device, args.threads)))
        return 0
    if args.time_child:
        if args.keep_freed_memory:
            keep_freed_memory()
        model, batch, method = args.time_child
        print(json.dumps(measure_time(model, int(batch), method, args.device, args.warmup, args.steps,
                                      args.threads, args.wall)))
        return 0

    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    if args.ops:
        start = time.perf_counter()
        ops_table(models, batches, args.threads, max(args.steps, 2))
        print(f"# total {time.perf_counter() - start:.0f} s")
        return 0
    methods = [m for m in args.methods.split(",") if m]
    if "plain" not in methods:
        methods.insert(0, "plain")
    import platform

    import torch

    clock = "wall-clock s" if (args.wall or args.device != "cpu") else "CPU s"
    threads = args.threads or torch.get_num_threads()
    print(f"# dbx estimator benchmark: torch {torch.__version__}, device {args.device}"
          + (f" ({threads} thread{'s' if threads > 1 else ''}, {platform.processor() or platform.machine()})"
             if args.device == "cpu" else f" ({torch.cuda.get_device_name(args.device)})")
          + f", {clock} per step" + (", glibc keeping freed memory" if args.keep_freed_memory else "")
          + "; each method's steps alternate with plain steps in one process"
          f" ({args.warmup} warm-up + {args.steps} timed pairs, {args.other_steps} for vmap, backpack, opacus),"
          f" 'x plain' is the median of the pairs' ratios; peak memory from a process of its own")
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for model in models:
        for batch in batches:
            row = {}
            for method in methods:
                why = available(method)
                row[method] = {"error": why} if why else measure_row(args, model, batch, method)
            plain_times = [p for r in row.values() for p, _ in r.get("pairs", [])]
            if plain_times and "error" not in row["plain"]:
                row["plain"].update(seconds=statistics.median(plain_times), ratio=1.0)
            results[f"{model}/B={batch}"] = row
            print_block(model, batch, methods, row)
    if args.forms:
        forms_table(args.device, max(batches), args.threads)
    if args.layers:
        layers_table(args.device, max(batches), args.threads, max(args.steps, 2))
    print(f"# total {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def print_block(model: str, batch: int, methods: list[str], row: dict[str, Any]) -> None:
    plain, exact = row.get("plain", {}), row.get("exact", {})
    shape = {"gpt": f", sequence {GPT['length']}", "lstm": f", sequence {LSTM['length']}"}.get(model, "")
    print(f"\n{model}, B={batch}{shape}" + (" (BatchNorm)" if model == "resnet18" else " (no BatchNorm)"))
    print(f"  {'method':<9} {'step s':>8} {'x plain':>8} {'peak MiB':>9} {'x plain':>8} {'diversity':>11}"
          f" {'vs exact':>9}")
    for method in methods:
        r = row[method]
        if "error" in r or "seconds" not in r:
            print(f"  {method:<9} {'-':>8} {'-':>8} {'-':>9} {'-':>8} {'-':>11} {'-':>9}  {r.get('error', '')}")
            continue
        t_ratio = r["ratio"]
        m_ratio = r["peak_bytes"] / plain["peak_bytes"] if plain.get("peak_bytes") else float("nan")
        div = r.get("diversity")
        vs = ""
        if div is not None and exact.get("diversity"):
            vs = f"{(div - exact['diversity']) / exact['diversity']:+.1e}" if method != "exact" else "="
        print(f"  {method:<9} {r['seconds']:8.3f} {t_ratio:7.2f}x {r['peak_bytes'] / 2**20:9.0f} {m_ratio:7.2f}x "
              f"{(f'{div:.5g}' if div is not None else ''):>11} {vs:>9}")
    if exact.get("first_step_ratio") and exact.get("check_peak_bytes") and plain.get("peak_bytes"):
        print(f"  exact's first step, with the self-check (once per measuring epoch): {exact['first_step_ratio']:.2f}x "
              f"plain's time, peak {exact['check_peak_bytes'] / 2**20:.0f} MiB "
              f"({exact['check_peak_bytes'] / plain['peak_bytes']:.2f}x plain's)")
    if model != "resnet18":
        diffs = [abs(row[m]["diversity"] - exact["diversity"]) / exact["diversity"] for m in methods
                 if m not in ("plain", "exact") and row[m].get("diversity") is not None and exact.get("diversity")]
        if diffs:
            verdict = "agree" if max(diffs) < 1e-4 else "DISAGREE"
            print(f"  diversity without BatchNorm: all methods {verdict} with exact"
                  f" (max relative difference {max(diffs):.1e})")


if __name__ == "__main__":
    sys.exit(main())

"""Per-sample squared norms for every supported layer, on random models, against two oracles.

- Models without BatchNorm: explicit per-sample gradients from ``torch.func`` (vmap over grad).
- Models with BatchNorm in training mode: the rows of the batch gradient, i.e. for each module and
  each sample i the vector-Jacobian product of the module's own output with the output gradient
  autograd delivered, restricted to sample i's rows. The test checks that these rows sum to the
  batch gradient, then that dbx's norms are theirs.

Random models mix Conv1d/Conv2d (random kernel, stride, padding and padding mode, dilation,
groups, bias), BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm, Embedding (with repeated
tokens and a padding index) and Linear over sequences; each is checked with the "ghost" form, the
"explicit" form and the automatic choice.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from dbx.errors import UserError
from dbx.estimators import ExactEstimator, kernels, per_sample_grads_func, per_sample_sq_norms

FORMS = st.sampled_from(["auto", "ghost", "explicit"])
# A handful of random models per test keeps the suite fast; DBX_RANDOM_MODELS=300 digs deeper.
SETTINGS = settings(max_examples=int(os.environ.get("DBX_RANDOM_MODELS", "15")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# -- oracles -------------------------------------------------------------------------------------------


def func_oracle(model, x, y, loss_fn=F.cross_entropy):
    """Per-layer (B,) squared norms of explicit per-sample gradients (torch.func)."""
    grads = per_sample_grads_func(model, loss_fn, x, y)
    out: dict[str, torch.Tensor] = {}
    for name, g in grads.items():
        path = name.rpartition(".")[0] or "root"
        out[path] = out.get(path, 0) + g.flatten(1).double().square().sum(1)
    return out


def rows_oracle(model, x, y, loss_fn=F.cross_entropy):
    """Per-layer (B,) squared norms of the rows of the batch gradient, by per-sample VJPs.

    Computed in float64 on a copy of the model: in float32 the rows' sum and the batch gradient
    differ by rounding, which exceeds any fixed tolerance when a layer's gradient cancels almost
    exactly (a normalisation right after a tiny conv).
    """
    model = copy.deepcopy(model).double()
    x = x.double() if x.is_floating_point() else x
    captured = {}
    handles = []
    owners = [(path, m) for path, m in model.named_modules()
              if any(p.requires_grad for p in m.parameters(recurse=False))]
    for path, module in owners:
        def hook(mod, args, output, path=path):
            grads = captured.setdefault(path, {"out": output})
            output.register_hook(lambda g: grads.__setitem__("grad", g))
        handles.append(module.register_forward_hook(hook))
    loss = loss_fn(model(x), y, reduction="sum")
    loss.backward(retain_graph=True)
    for h in handles:
        h.remove()
    largest = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    result = {}
    for path, module in owners:
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        out, grad = captured[path]["out"], captured[path]["grad"]
        rows = []
        for i in range(x.shape[0]):
            mask = torch.zeros_like(grad)
            mask[i] = grad[i]
            rows.append(torch.autograd.grad(out, params, mask, retain_graph=True))
        for j, p in enumerate(params):  # the per-sample terms sum to the batch gradient
            terms = max(r[j].abs().max().item() for r in rows)
            torch.testing.assert_close(sum(r[j] for r in rows), p.grad, rtol=1e-4, atol=1e-6 * largest + 1e-4 * terms)
        result[path] = torch.stack([sum(g.double().square().sum() for g in r) for r in rows])
    model.zero_grad(set_to_none=True)
    return result


def natural_scale(model, x, y, loss_fn=F.cross_entropy):
    """Per-layer (B,) scale of the terms a Gram ("ghost") form adds up: ||a_i||^2 ||b_i||^2 x taps.

    Float32 Gram forms carry an absolute error of about 1e-7 of it; it matters only in layers whose
    per-position contributions cancel almost exactly (a normalisation right after a tiny conv).
    """
    captured = {}
    handles = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)):
            continue
        def hook(mod, args, output, path=path):
            entry = captured.setdefault(path, {"x": args[0]})
            output.register_hook(lambda g: entry.__setitem__("g", g))
        handles.append(module.register_forward_hook(hook))
    loss_fn(model(x), y, reduction="sum").backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    scales = {}
    for path, module in model.named_modules():
        if path not in captured or "g" not in captured[path]:
            continue
        inp, g = captured[path]["x"], captured[path]["g"]
        g_sq = g.flatten(1).double().square().sum(1)
        if isinstance(module, nn.Embedding):
            scales[path] = g_sq * inp[0].numel()
        else:
            taps = math.prod(module.kernel_size) if isinstance(module, (nn.Conv1d, nn.Conv2d)) else 1
            scales[path] = inp.flatten(1).double().square().sum(1) * g_sq * taps
    return scales


def assert_norms_match(ours, oracle, scales=None, rtol=1e-4):
    """Per layer and sample: |ours - oracle| <= rtol |oracle| + 1e-6 x (the layer's natural scale
    and the sample's whole squared norm): layers whose gradient vanishes are compared at noise level."""
    assert set(ours.per_layer) == set(oracle), (sorted(ours.per_layer), sorted(oracle))
    scales = scales or {}
    total = sum(oracle.values())
    total_slack = 1e-6 * sum(scales.values(), torch.zeros_like(total))
    bad = (ours.total.double() - total).abs() > rtol * total + total_slack
    assert not bad.any(), f"total: ours {ours.total.tolist()} oracle {total.tolist()}"
    for path, expected in oracle.items():
        got = ours.per_layer[path].double()
        slack = 1e-6 * (scales.get(path, torch.zeros_like(expected)) + total) + 1e-12
        bad = (got - expected).abs() > rtol * expected.abs() + slack
        assert not bad.any(), f"layer {path}: ours {got.tolist()} oracle {expected.tolist()} slack {slack.tolist()}"


# -- random models -----------------------------------------------------------------------------------


def out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@st.composite
def conv_block(draw, dims, c_in, size, allow_bn):
    """A Conv{dims}d with random geometry, maybe followed by a normalisation layer."""
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if c_in % g == 0]))
    c_out = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    assume(c_in * c_out // groups * math.prod(kernel) > 1)  # a scalar weight teaches nothing and is ill-conditioned
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from([0, 1, 2, "valid"] + (["same"] if stride == 1 else [])))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    numeric = {"valid": 0}.get(padding, padding)
    if padding == "same":
        numeric = max(dilation * (k - 1) for k in kernel)
    per_side = -(-numeric // 2) if padding == "same" else numeric  # "same" splits the total padding
    assume(mode == "zeros" or per_side < size)  # reflect/replicate/circular pad less than the input
    if padding == "same":
        new = size
    else:
        new = min(out_size(size, k, stride, numeric, dilation) for k in kernel)
    assume(new >= 1)
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    conv = cls(c_in, c_out, kernel if dims == 2 else kernel[0], stride=stride, padding=padding, dilation=dilation,
               groups=groups, bias=draw(st.booleans()), padding_mode=mode)
    spatial = new ** dims if padding == "same" else None
    norms = ["none", "gn", "ln"] + (["bn"] if allow_bn else []) + (["in"] if new > 1 else [])
    if c_out == 1:  # normalising a single channel makes its conv's weight gradient vanish to rounding
        norms = ["none"]
    norm = draw(st.sampled_from(norms))
    layers = [conv]
    if norm == "bn":
        layers.append((nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c_out))
    elif norm == "gn":
        # GroupNorm needs more than one value per group (of one sample)
        choices = [g for g in (1, 2, 3) if c_out % g == 0 and c_out // g * new ** dims > 1]
        assume(choices)
        layers.append(nn.GroupNorm(draw(st.sampled_from(choices)), c_out))
    elif norm == "in":
        layers.append((nn.InstanceNorm1d if dims == 1 else nn.InstanceNorm2d)(c_out, affine=True))
    elif norm == "ln":
        layers.append("ln")  # the trailing size is known only after a dry run
    layers.append(nn.Tanh())
    return layers, c_out, spatial


def build(layers, example):
    """nn.Sequential from blocks, resolving LayerNorm placeholders over the trailing dimension."""
    modules = []
    h = example
    for layer in layers:
        if layer == "ln":
            layer = nn.LayerNorm(h.shape[-1])
        modules.append(layer)
        with torch.no_grad():
            h = layer(h)
    return nn.Sequential(*modules), h


def well_conditioned(model, x, smallest=8):
    """Every normalisation layer normalises at least ``smallest`` values per sample and group.

    Normalising a handful of values is so ill-conditioned that float32 rounding (a per-sample
    forward versus a batched one, or two summation orders) shows in the fourth digit.
    """
    sizes = []
    def hook(module, args, output):
        inp = args[0]
        if isinstance(module, nn.GroupNorm):
            sizes.append(inp[0].numel() // module.num_groups)
        elif isinstance(module, nn.LayerNorm):
            sizes.append(math.prod(module.normalized_shape))
        elif isinstance(module, (nn.InstanceNorm1d, nn.InstanceNorm2d)):
            sizes.append(inp[0, 0].numel())
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            sizes.append(inp[:, 0].numel())
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return all(size >= smallest for size in sizes)


@st.composite
def conv_model(draw, dims, allow_bn):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    c = draw(st.integers(1, 4))
    size = draw(st.integers(3, 7))
    batch = draw(st.integers(2, 5))
    x = torch.randn(batch, c, *([size] * dims))
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        current = build(blocks, x)[1] if blocks else x
        block, c, _ = draw(conv_block(dims, current.shape[1], min(current.shape[2:]), allow_bn))
        blocks += block
    features, h = build(blocks, x)
    assume(well_conditioned(nn.Sequential(*features), x))
    classes = draw(st.integers(2, 4))
    model = nn.Sequential(*features, nn.Flatten(), nn.Linear(h[0].numel(), classes))
    y = torch.randint(0, classes, (batch,))
    return model, x, y


class SequenceModel(nn.Module):
    def __init__(self, vocab, dim, hidden, classes, padding_idx, norm, conv):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.norm = {"ln": nn.LayerNorm(dim), "rms": nn.RMSNorm(dim), "none": nn.Identity()}[norm]
        self.proj = nn.Linear(dim, hidden)
        self.conv = conv
        self.head = nn.Linear(hidden if conv is None else conv.out_channels, classes)

    def forward(self, tokens):
        h = self.proj(self.norm(self.embed(tokens)))  # (B, T, hidden): Linear over a sequence
        if self.conv is not None:
            h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(h).mean(1))


@st.composite
def sequence_model(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    vocab = draw(st.integers(2, 12))
    dim, hidden, classes = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(2, 4))
    length, batch = draw(st.integers(1, 24)), draw(st.integers(2, 5))
    padding_idx = draw(st.sampled_from([None, 0]))
    conv = None
    if draw(st.booleans()):
        k = draw(st.integers(1, 3))
        assume(k <= length)
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if hidden % g == 0]))
        conv = nn.Conv1d(hidden, groups * draw(st.integers(1, 2)), k, groups=groups, padding=draw(st.integers(0, 1)))
    model = SequenceModel(vocab, dim, hidden, classes, padding_idx, draw(st.sampled_from(["ln", "rms", "none"])), conv)
    tokens = torch.randint(0, vocab, (batch, length))
    return model, tokens, torch.randint(0, classes, (batch,))


# -- the tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2], ids=["conv1d", "conv2d"])
@SETTINGS
@given(data=st.data(), form=FORMS)
def test_conv_models_match_torch_func(dims, data, form):
    model, x, y = data.draw(conv_model(dims=dims, allow_bn=False))
    ours = per_sample_sq_norms(model, F.cross_entropy, x, y, form=form)
    assert_norms_match(ours, func_oracle(model, x, y), natural_scale(model, x, y))


@pytest.mark.parametrize("dims", [1, 2], ids=["conv1d", "conv2d"])
@SETTINGS
@given(data=st.data(), form=FORMS)
def test_conv_models_with_batchnorm_match_the_rows_of_the_batch_gradient(dims, data, form):
    model, x, y = data.draw(conv_model(dims=dims, allow_bn=True))
    model.train()
    ours = per_sample_sq_norms(model, F.cross_entropy, x, y, form=form)
    assert_norms_match(ours, rows_oracle(model, x, y), natural_scale(model, x, y))


@SETTINGS
@given(case=sequence_model(), form=FORMS)
def test_embedding_sequence_models_match_torch_func(case, form):
    model, tokens, y = case
    ours = per_sample_sq_norms(model, F.cross_entropy, tokens, y, form=form)
    assert_norms_match(ours, func_oracle(model, tokens, y), natural_scale(model, tokens, y))


def test_batchnorm_in_eval_mode_and_batchnorm1d_on_features_match_torch_func():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    model.train()
    assert_norms_match(per_sample_sq_norms(model, F.cross_entropy, x, y), rows_oracle(model, x, y))
    model(torch.randn(16, 5))  # running statistics that differ from the defaults
    model.eval()
    assert_norms_match(per_sample_sq_norms(model, F.cross_entropy, x, y), func_oracle(model, x, y))


def test_long_sequences_use_the_sorted_embedding_kernel():
    torch.manual_seed(0)
    emb = nn.Embedding(7, 3, padding_idx=2)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(40 * 3, 2))
    tokens = torch.randint(0, 7, (4, 40))
    y = torch.randint(0, 2, (4,))
    for form in ("auto", "explicit", "ghost"):  # auto and explicit sort, ghost builds the T x T Gram
        ours = per_sample_sq_norms(model, F.cross_entropy, tokens, y, form=form)
        assert_norms_match(ours, func_oracle(model, tokens, y))


def test_a_module_called_twice_adds_its_gradients():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Linear(6, 6)
            self.unused = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.block(x))
            h = torch.tanh(self.block(h))  # same weights, second use
            self.block(h)  # a third use whose output is thrown away: contributes nothing
            return self.head(h)

    torch.manual_seed(0)
    model = Twice()
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    ours = per_sample_sq_norms(model, F.cross_entropy, x, y, layers=["block", "head"])
    oracle = func_oracle(model, x, y)
    oracle.pop("unused", None)
    assert_norms_match(ours, oracle)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
    nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(0, 1)), nn.Conv2d(4, 4, 3, padding="same", padding_mode="circular"),
    nn.Conv2d(4, 6, 1, stride=2), nn.Conv1d(4, 6, 5, stride=3, padding=2)], ids=repr)
def test_the_gpu_way_of_summing_kernel_taps_gives_the_same_norms(monkeypatch, conv):
    torch.manual_seed(0)
    x = torch.randn(5, 4, *(9, 7)[:conv.weight.dim() - 2])
    g = torch.randn_like(conv(x))
    block_by_block = kernels._conv_ghost(conv, x, g)
    monkeypatch.setattr(kernels, "TAPS_IN_ONE_REDUCTION", {x.device.type})
    one_reduction = kernels._conv_ghost(conv, x, g)
    torch.testing.assert_close(one_reduction, block_by_block, rtol=1e-5, atol=1e-6)


@st.composite
def conv_geometry(draw):
    dims, groups = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    stride = draw(st.integers(1, 3))
    conv_type = nn.Conv1d if dims == 1 else nn.Conv2d
    conv = conv_type(groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3)), draw(st.integers(1, 4)),
                     stride=stride, dilation=draw(st.integers(1, 2)), groups=groups, bias=False,
                     padding=draw(st.sampled_from([0, 1, 2, 3] + (["same"] if stride == 1 else []))),
                     padding_mode=draw(st.sampled_from(["zeros", "reflect", "circular"])))
    size = draw(st.lists(st.integers(3, 11), min_size=dims, max_size=dims))
    return conv.double(), size


@SETTINGS
@given(case=conv_geometry(), taps_in_one_reduction=st.booleans())
def test_the_gram_form_matches_the_explicit_form_for_any_geometry(case, taps_in_one_reduction):
    # stride phases, separable taps (CPU) and the strided tap sum (GPU), against per-sample gradients
    conv, size = case
    x = torch.randn(3, conv.in_channels, *size, dtype=torch.float64)
    try:
        g = torch.randn_like(conv(x))
    except RuntimeError:  # padding larger than the input for reflect, or an empty output
        assume(False)
    saved = set(kernels.TAPS_IN_ONE_REDUCTION)
    try:
        kernels.TAPS_IN_ONE_REDUCTION.clear()
        if taps_in_one_reduction:
            kernels.TAPS_IN_ONE_REDUCTION.add(x.device.type)
        gram = kernels._conv_ghost(conv, x, g)
    finally:
        kernels.TAPS_IN_ONE_REDUCTION.clear()
        kernels.TAPS_IN_ONE_REDUCTION.update(saved)
    torch.testing.assert_close(gram, kernels._conv_explicit(conv, [x], [g], [False]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 4, 1, bias=False), nn.Conv2d(6, 4, 1, stride=2, groups=2), nn.Conv2d(6, 4, 1, stride=(1, 3)),
    nn.Conv1d(6, 9, 1, stride=2, groups=3), nn.Conv2d(6, 4, 1, padding=1, padding_mode="circular")], ids=repr)
def test_pointwise_convolutions_take_per_sample_gradients_from_one_matrix_product(conv):
    # strided, grouped and 1-d pointwise convolutions, with and without supplying the batch gradient
    torch.manual_seed(0)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(5, 6, *(7, 8)[:conv.weight.dim() - 2]), torch.randint(0, 3, (5,))
    model(x)
    assert kernels._pointwise(tuple(conv.kernel_size), kernels._conv_padding(conv, x)[1])
    expected = func_oracle(model, x, y)
    assert_norms_match(per_sample_sq_norms(model, F.cross_entropy, x, y, form="explicit"), expected)
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y, reduction="sum").backward()
    estimator = ExactEstimator()
    estimator.attach(model)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    estimator.on_backward(1.0)
    estimator.on_step(1.0)
    assert estimator._hooks.layers[0].fusable
    torch.testing.assert_close(conv.weight.grad, reference[0].weight.grad, rtol=1e-5, atol=1e-6)
    sum_sq = estimator.estimate(model, F.cross_entropy, None).sum_sq_norms
    assert sum_sq == pytest.approx(float(sum(expected.values()).sum()), rel=1e-4)


def test_batchnorm_terms_without_the_fused_backward_are_the_same(monkeypatch):
    # the path taken on a backend whose batch-norm backward refuses the per-sample layout
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 3))
    x, y = torch.randn(7, 3, 7, 7), torch.randint(0, 3, (7,))
    fused = per_sample_sq_norms(model, F.cross_entropy, x, y)
    monkeypatch.setattr(kernels, "_NO_FUSED_BN", {x.device.type})
    separate = per_sample_sq_norms(model, F.cross_entropy, x, y)
    assert_norms_match(separate, {path: norms.double() for path, norms in fused.per_layer.items()})


@pytest.mark.parametrize("size", [300, 5000, 1 << 18], ids=lambda n: f"{n} entries")
def test_squared_norms_of_long_rows_stay_accurate(size):
    # all-equal entries are the worst case for a naive float32 sum (2e-4 off at 256K entries)
    rows = torch.cat([torch.full((1, size), 0.3), torch.randn(2, size)])
    exact = rows.double().square().sum(1)
    torch.testing.assert_close(kernels._sq(rows, 1).double(), exact, rtol=2e-6, atol=0)
    torch.testing.assert_close(kernels._sq(rows.view(3, 1, size), (1, 2)).double(), exact, rtol=2e-6, atol=0)


@pytest.mark.parametrize("form", ["ghost", "explicit"])
def test_splitting_the_batch_into_chunks_does_not_change_the_norms(monkeypatch, form):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2), nn.Flatten(2),
                          nn.Linear(4 * 4, 5), nn.Flatten(), nn.Linear(4 * 5, 3))
    x, y = torch.randn(9, 3, 7, 7), torch.randint(0, 3, (9,))
    whole = per_sample_sq_norms(model, F.cross_entropy, x, y, form=form)
    monkeypatch.setitem(kernels.CHUNK_ELEMENTS, x.device.type, 1)  # one sample per chunk
    chunked = per_sample_sq_norms(model, F.cross_entropy, x, y, form=form)
    assert_norms_match(chunked, {path: norms.double() for path, norms in whole.per_layer.items()})


def test_micro_batching_does_not_change_the_result():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, groups=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.Flatten(), nn.LayerNorm(36), nn.Linear(36, 5))
    x, y = torch.randn(30, 3, 7, 7), torch.randint(0, 5, (30,))
    values = []
    for micro in (12, 5, 1):
        model = copy.deepcopy(base)
        estimator = ExactEstimator()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        estimator.attach(model)
        for s in range(0, 30, 12):
            xb, yb = x[s:s + 12], y[s:s + 12]
            for m in range(0, len(xb), micro):
                (F.cross_entropy(model(xb[m:m + micro]), yb[m:m + micro], reduction="sum") / len(xb)).backward()
                estimator.on_backward(1 / len(xb))
            estimator.on_step(1 / len(xb))
            opt.step()
            opt.zero_grad(set_to_none=True)
        values.append(estimator.estimate(model, F.cross_entropy, (x, y)).value)
        estimator.detach()
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    assert values[2] == pytest.approx(values[0], rel=1e-5)


def test_inplace_activation_after_batchnorm_is_measured_before_it():
    # ResNet blocks apply ReLU(inplace=True) to BatchNorm's output; the hook must see the gradient
    # that reaches BatchNorm's output, not the ReLU's.
    def make(inplace):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=inplace), nn.Conv2d(4, 3, 3),
                             nn.BatchNorm2d(3), nn.ReLU(inplace=inplace), nn.Flatten(), nn.Linear(3, 2))
    x, y = torch.randn(5, 2, 5, 5), torch.randint(0, 2, (5,))
    reference = rows_oracle(make(False), x, y)
    ours = per_sample_sq_norms(make(True), F.cross_entropy, x, y)
    assert_norms_match(ours, reference)


def test_shared_parameters_without_the_fallback_are_an_error_naming_both_modules():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, tokens):
            return self.out(self.embed(tokens).mean(1))

    with pytest.raises(UserError, match=r"embed\.weight is used by 'embed', 'out'.*exclude: \['embed', 'out'\]"):
        ExactEstimator(fallback_forbid=["out"]).attach(Tied())
    tokens, labels, model = torch.randint(0, 10, (3, 5)), torch.randint(0, 10, (3,)), Tied()
    auto = per_sample_sq_norms(model, F.cross_entropy, tokens, labels, method="auto",
                               fallback_forbid=["*"])  # torch.func handles them
    measured = per_sample_sq_norms(model, F.cross_entropy, tokens, labels)  # both uses, summed per sample
    torch.testing.assert_close(measured.total, auto.total, rtol=1e-5, atol=1e-7)


def test_weights_used_without_calling_the_module_are_an_error_at_the_first_step():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.aux = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) + F.linear(x, self.aux.weight)

    model = Functional()
    estimator = ExactEstimator()
    estimator.attach(model)
    F.cross_entropy(model(torch.randn(4, 4)), torch.tensor([0, 1, 2, 0])).backward()
    with pytest.raises(UserError, match=r"'aux' \(Linear\).*never called"):
        estimator.on_backward(0.25)
    estimator.detach()


def test_a_batch_folded_into_another_dimension_is_an_error():
    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):  # (B, T, 4) -> (B*T, 4): per-row norms would not be per-sample norms
            return self.fc(x.reshape(-1, 4)).reshape(x.shape[0], -1).sum(1, keepdim=True)

    estimator = ExactEstimator()
    model = Folded()
    estimator.attach(model)
    with pytest.raises(UserError, match=r"batch-first.*'fc' \(Linear\) received shape \(12, 4\).*3 samples"):
        model(torch.randn(3, 4, 4))
    estimator.detach()


def test_weight_norm_and_custom_subclasses_are_not_mistaken_for_supported_layers():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert kernels.kernel_for(MyLinear(2, 2)) is None
    assert kernels.kernel_for(nn.utils.weight_norm(nn.Linear(2, 2))) is None
    assert kernels.kernel_for(nn.Embedding(4, 2, sparse=True)) is None
    assert kernels.kernel_for(nn.Linear(2, 2)) is not None
    with pytest.raises(UserError, match="MyLinear"):  # refused when the generic fallback may not take it
        ExactEstimator(fallback_forbid=["0"]).attach(nn.Sequential(MyLinear(2, 2)))


def test_frozen_parameters_are_left_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.PReLU(), nn.Linear(5, 3))
    model[2].weight.requires_grad_(False)  # a frozen unsupported module needs no support
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    ours = per_sample_sq_norms(model, F.cross_entropy, x, y)
    assert_norms_match(ours, func_oracle(model, x, y))


# -- mixed precision ----------------------------------------------------------------------------------


def test_half_precision_inputs_do_not_overflow():
    # squares of these fp16 values overflow fp16 (max 65504); the kernels accumulate in float32
    torch.manual_seed(0)
    a = (torch.randn(4, 6, 64) * 300).half()
    g = (torch.randn(4, 6, 32) * 300).half()
    exact = torch.einsum("bto,bti->boi", g.double(), a.double()).square().sum((1, 2))
    for form in ("ghost", "explicit"):
        got = kernels.sum_outer_sq_norms(a, g, form)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=0)
    rank_one = kernels.sum_outer_sq_norms(a[:, :1], g[:, :1])
    expected = a[:, 0].double().square().sum(1) * g[:, 0].double().square().sum(1)
    torch.testing.assert_close(rank_one.double(), expected, rtol=1e-4, atol=0)


def test_bfloat16_autocast_training_gives_finite_float32_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10))
    x, y = torch.randn(16, 3, 8, 8) * 50, torch.randint(0, 10, (16,))
    reference = per_sample_sq_norms(model, F.cross_entropy, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = per_sample_sq_norms(model, F.cross_entropy, x, y)
    assert mixed.total.dtype == torch.float32 and torch.isfinite(mixed.total).all()
    torch.testing.assert_close(mixed.total, reference.total, rtol=5e-2, atol=0)
    # the online estimator with bf16 gradients accumulates its sums in float32
    estimator = ExactEstimator()
    estimator.attach(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y, reduction="sum") / 16
    loss.backward()
    estimator.on_backward(1 / 16)
    estimator.on_step(1 / 16)
    est = estimator.estimate(model, F.cross_entropy, (x, y))
    estimator.detach()
    assert math.isfinite(est.value)
    assert est.value == pytest.approx(reference.diversity(), rel=5e-2)


def test_a_bfloat16_model_accumulates_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(12, 8), torch.randint(0, 4, (12,))
    reference = per_sample_sq_norms(model, F.cross_entropy, x, y).diversity()
    model = model.to(torch.bfloat16)
    estimator = ExactEstimator()
    estimator.attach(model)
    (F.cross_entropy(model(x.bfloat16()).float(), y, reduction="sum") / 12).backward()
    estimator.on_backward(1 / 12)
    estimator.on_step(1 / 12)
    est = estimator.estimate(model, F.cross_entropy, (x, y))
    estimator.detach()
    assert est.value == pytest.approx(reference, rel=5e-2)


# -- fused weight gradients: measuring must not change training ----------------------------------------


class TwoUses(nn.Module):
    """A wide conv (explicit form, fused), a conv used twice, a Linear over a long sequence."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.wide = nn.Conv2d(4, 4, 3, padding=1, bias=False)  # 16x16 positions: explicit, fused
        self.bn = nn.BatchNorm2d(4)
        self.seq = nn.Linear(4, 3)  # over 64 positions: explicit
        self.head = nn.Linear(3, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.bn(self.wide(h)))
        h = torch.relu(self.wide(h))  # the same weights again
        h = F.avg_pool2d(h, 2).flatten(2).transpose(1, 2)  # (B, 64, 4)
        return self.head(torch.tanh(self.seq(h)).mean(1))


def test_fused_weight_gradients_leave_training_unchanged():
    torch.manual_seed(0)
    base = TwoUses()
    x, y = torch.randn(20, 3, 16, 16), torch.randint(0, 5, (20,))
    assert kernels._conv_plan(base.wide, torch.randn(1, 4, 16, 16), "auto") == "explicit"
    assert kernels._linear_plan(base.seq, torch.randn(1, 64, 4), "auto") == "explicit"
    results = {}
    runs = (("none", None), ("fused", ExactEstimator()), ("plain", ExactEstimator(fuse_weight_grads=False)))
    for name, estimator in runs:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if estimator:
            estimator.attach(model)
        for s in range(0, 20, 8):
            xb, yb = x[s:s + 8], y[s:s + 8]
            for m in range(0, len(xb), 3):
                (F.cross_entropy(model(xb[m:m + 3]), yb[m:m + 3], reduction="sum") / len(xb)).backward()
                if estimator:
                    estimator.on_backward(1 / len(xb))
            if estimator:
                estimator.on_step(1 / len(xb))
            opt.step()
            opt.zero_grad(set_to_none=True)
        value = estimator.estimate(model, F.cross_entropy, (x, y)).value if estimator else None
        if estimator:
            estimator.detach()
        assert all(isinstance(p, nn.Parameter) for p in model.parameters())
        results[name] = (model.state_dict(), value)
    for key, expected in results["none"][0].items():
        torch.testing.assert_close(results["fused"][0][key], expected, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(results["plain"][0][key], expected, rtol=1e-5, atol=1e-6, msg=key)
    assert results["fused"][1] == pytest.approx(results["plain"][1], rel=1e-5)


def test_a_first_layer_without_bias_is_fused_and_an_in_place_activation_after_it_still_works():
    # its input needs no gradient and its weight is detached: only the hooks keep it on the backward path
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(16 * 8 * 8, 4))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    results = {}
    for name, estimator in (("none", None), ("fused", ExactEstimator()), ("plain", ExactEstimator(fuse_weight_grads=False))):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        first_output = []
        if estimator:
            estimator.attach(model)
        model[0].register_forward_hook(lambda module, args, output, seen=first_output: seen.append(output.grad_fn))
        for _ in range(2):
            (F.cross_entropy(model(x), y, reduction="sum") / 6).backward()
            if estimator:
                estimator.on_backward(1 / 6)
                estimator.on_step(1 / 6)
            opt.step()
            opt.zero_grad(set_to_none=True)
        results[name] = (model.state_dict(), estimator.estimate(model, F.cross_entropy, None).value if estimator else None)
        fused = type(first_output[0]).__name__ == "_ReachBackward"
        assert fused == (name == "fused"), name
    for key, expected in results["none"][0].items():
        torch.testing.assert_close(results["fused"][0][key], expected, rtol=1e-5, atol=1e-6, msg=key)
    assert results["fused"][1] == pytest.approx(results["plain"][1], rel=1e-5)


def test_a_detached_weight_is_restored_even_when_the_forward_fails():
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    model = nn.Sequential(conv)
    weight = conv.weight
    estimator = ExactEstimator()
    estimator.attach(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 16, 16, requires_grad=True))  # wrong channel count: conv raises
    estimator.detach()
    assert conv.weight is weight and conv._parameters["weight"] is weight


@settings(max_examples=int(os.environ.get("DBX_RANDOM_MODELS", "15")) // 3 + 1, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=conv_model(dims=2, allow_bn=True), fused_first=st.booleans())
def test_random_models_train_identically_with_fused_weight_gradients(case, fused_first):
    model, x, y = case
    x = torch.cat([x, x.flip(0)])  # two micro-batches of the batch
    y = torch.cat([y, y.flip(0)])
    half = x.shape[0] // 2
    states, values = [], []
    for estimator in (None, ExactEstimator(fuse_weight_grads=fused_first),
                      ExactEstimator(fuse_weight_grads=not fused_first)):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        if estimator:
            estimator.attach(m)
        for _ in range(2):
            for part in (slice(0, half), slice(half, None)):
                (F.cross_entropy(m(x[part]), y[part], reduction="sum") / x.shape[0]).backward()
                if estimator:
                    estimator.on_backward(1 / x.shape[0])
            if estimator:
                estimator.on_step(1 / x.shape[0])
            opt.step()
            opt.zero_grad(set_to_none=True)
        if estimator:
            values.append(estimator.estimate(m, F.cross_entropy, (x, y)).value)
            estimator.detach()
        states.append(m.state_dict())
    for key, expected in states[0].items():
        for state in states[1:]:
            torch.testing.assert_close(state[key], expected, rtol=1e-4, atol=1e-6, msg=key)
    assert values[0] == pytest.approx(values[1], rel=1e-4)

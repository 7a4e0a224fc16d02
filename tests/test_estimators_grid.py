"""Per-sample gradient norms of every supported layer, by dedicated kernel or generic fallback, over a
grid of configurations (strides, padding strings and modes, dilation, groups, batch_first both ways,
T == B, bias and affine on and off, an empty batch), against an explicit per-sample loop in float64:
per layer and total."""
import itertools

import pytest
import torch
from torch import nn

from dbx.estimators import per_sample_sq_norms


class Wrap(nn.Module):
    """Applies ``layer`` to a batch-first input; time-major layers get (T, B, ...) and give it back."""

    def __init__(self, layer: nn.Module, time_major: bool = False, kind: str = "plain"):
        super().__init__()
        self.layer, self.time_major, self.kind = layer, time_major, kind

    def forward(self, x):
        x, *extra = x if isinstance(x, tuple) else (x,)
        if self.time_major:
            x = x.transpose(0, 1)
        if self.kind == "mha":
            mask = torch.triu(torch.full((x.shape[1 - int(self.time_major)], ) * 2, float("-inf"),
                                         dtype=x.dtype), 1)
            out = self.layer(x, x, x, attn_mask=mask, need_weights=False)[0]
        elif self.kind == "cross":
            other = extra[0].transpose(0, 1) if self.time_major else extra[0]
            out = self.layer(x, other, other, need_weights=False)[0]
        elif self.kind == "rnn":
            out = self.layer(x)[0]
        elif self.kind == "bilinear":
            out = self.layer(x, extra[0])
        else:
            out = self.layer(x)
        if self.time_major:
            out = out.transpose(0, 1)
        return out.flatten(1)


def projection_loss(out, target, reduction="sum"):
    return (out * target).sum()


def explicit(model, inputs, target):
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    rows = []
    for i in range(target.shape[0]):
        one = tuple(x[i:i + 1] for x in inputs)
        grads = torch.autograd.grad(projection_loss(model(one if len(one) > 1 else one[0]), target[i:i + 1]),
                                    list(params.values()))
        rows.append({n: g for n, g in zip(params, grads, strict=True)})
    return rows


def case(layer, shape, *, time_major=False, kind="plain", extra=None, ints=None):
    return layer, shape, time_major, kind, extra, ints


CASES = {}
for stride, padding, dilation, groups, bias in itertools.product((1, 2), (0, 1, "same"), (1, 2), (1, 2), (True, False)):
    if padding == "same" and stride != 1:
        continue
    CASES[f"conv3d-s{stride}-p{padding}-d{dilation}-g{groups}-b{bias}"] = case(
        nn.Conv3d(2, 4, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias), (2, 5, 5, 5))
for mode in ("zeros", "reflect", "replicate", "circular"):
    CASES[f"conv2d-{mode}"] = case(nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), (2, 6, 6))
    CASES[f"conv1d-{mode}-s2"] = case(nn.Conv1d(2, 3, 3, stride=2, padding=1, padding_mode=mode), (2, 7))
for stride, padding, out_pad, dilation, groups, bias in itertools.product((1, 2), (0, 1), (0, 1), (1, 2), (1, 2),
                                                                          (True, False)):
    if out_pad >= max(stride, dilation):
        continue
    CASES[f"convT2d-s{stride}-p{padding}-o{out_pad}-d{dilation}-g{groups}-b{bias}"] = case(
        nn.ConvTranspose2d(2, 4, 3, stride=stride, padding=padding, output_padding=out_pad, dilation=dilation,
                           groups=groups, bias=bias), (2, 4, 4))
    CASES[f"convT1d-s{stride}-p{padding}-o{out_pad}-d{dilation}-g{groups}-b{bias}"] = case(
        nn.ConvTranspose1d(2, 4, 3, stride=stride, padding=padding, output_padding=out_pad, dilation=dilation,
                           groups=groups, bias=bias), (2, 5))
for mode, per_sample_weights in (("sum", False), ("mean", False), ("max", False), ("sum", True)):
    CASES[f"embeddingbag-{mode}-{per_sample_weights}"] = case(nn.EmbeddingBag(10, 3, mode=mode), (4,), ints=10)
CASES["prelu-1"] = case(nn.PReLU(), (3, 4))
CASES["prelu-channels"] = case(nn.PReLU(3), (3, 4))
for bias in (True, False):
    CASES[f"bilinear-b{bias}"] = case(nn.Bilinear(3, 4, 2, bias=bias), (3,), kind="bilinear", extra=(4,))
for cell, layers, bidirectional, batch_first, bias in itertools.product(
        (nn.RNN, nn.LSTM, nn.GRU), (1, 2), (False, True), (True, False), (True, False)):
    name = f"{cell.__name__}-l{layers}-bi{bidirectional}-bf{batch_first}-b{bias}"
    CASES[name] = case(cell(3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                            bias=bias), (6, 3), time_major=not batch_first, kind="rnn")
for batch_first, bias, kv in itertools.product((True, False), (True, False), (False, True)):
    kw = {"kdim": 5, "vdim": 5} if kv else {}
    name = f"mha-bf{batch_first}-b{bias}-kv{kv}"
    if kv:
        CASES[name] = case(nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first, **kw), (6, 8),
                           time_major=not batch_first, kind="cross", extra=(4, 5))
    else:
        CASES[name] = case(nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first), (6, 8),
                           time_major=not batch_first, kind="mha")
CASES["mha-add-bias-kv"] = case(nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True), (6, 8), kind="mha")


def inputs_for(shape, extra, ints, batch, gen):
    if ints is not None:
        first = torch.randint(0, ints, (batch, *shape), generator=gen)
    else:
        first = torch.randn(batch, *shape, generator=gen, dtype=torch.float64)
    if extra is None:
        return (first,)
    return first, torch.randn(batch, *extra, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name", list(CASES))
def test_layer_norms_equal_an_explicit_per_sample_loop(name):
    layer, shape, time_major, kind, extra, ints = CASES[name]
    torch.manual_seed(0)
    model = Wrap(layer.double(), time_major=time_major, kind=kind)
    gen = torch.Generator().manual_seed(1)
    batch = shape[0] if len(shape) >= 1 and kind in ("rnn", "mha", "cross") else 4  # T == B for sequences
    inputs = inputs_for(shape, extra, ints, batch, gen)
    with torch.no_grad():
        out = model(inputs if len(inputs) > 1 else inputs[0])
    target = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ours = per_sample_sq_norms(model, projection_loss, inputs if len(inputs) > 1 else inputs[0], target)
    rows = explicit(model, inputs, target)
    total = torch.stack([sum(g.square().sum() for g in r.values()) for r in rows])
    torch.testing.assert_close(ours.total.double(), total, rtol=1e-8, atol=1e-12)
    assert list(ours.per_layer) == ["layer"]
    for n, g in ours.grad_sum.items():
        torch.testing.assert_close(g.double(), sum(r[n] for r in rows), rtol=1e-8, atol=1e-12)


def test_an_empty_batch_gives_empty_results():
    model = Wrap(nn.LSTM(3, 4, batch_first=True), kind="rnn")
    result = per_sample_sq_norms(model, projection_loss, torch.randn(0, 5, 3), torch.randn(0, 20))
    assert result.total.shape == (0,) and result.per_layer["layer"].shape == (0,)
    assert all(not g.any() for g in result.grad_sum.values())


def test_modules_that_couple_samples_keep_a_clear_error():
    from dbx.errors import UserError

    model = nn.Sequential(nn.Embedding(6, 3, scale_grad_by_freq=True), nn.Flatten())
    with pytest.raises(UserError, match=r"'0' \(Embedding\).*scale_grad_by_freq.*couples the samples"):
        per_sample_sq_norms(model, projection_loss, torch.randint(0, 6, (4, 5)), torch.randn(4, 15))
    dropout = Wrap(nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True), kind="mha")
    x, target = torch.randn(3, 4, 8), torch.randn(3, 32)
    with pytest.raises(UserError, match=r"'layer' \(MultiheadAttention\).*dropout"):  # a mask it cannot repeat
        per_sample_sq_norms(dropout, projection_loss, x, target, fallback_force=["layer"])
    measured = per_sample_sq_norms(dropout, projection_loss, x, target)  # its own rule reads the step's mask
    assert (measured.total > 0).all()


def test_loss_modules_are_accepted_like_functions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    module = per_sample_sq_norms(model, loss, x, y)
    function = per_sample_sq_norms(model, torch.nn.functional.cross_entropy, x, y)
    torch.testing.assert_close(module.total, function.total)
    assert loss.reduction == "mean"  # left as it was


def test_float32_matches_the_float64_loop_to_1e_4():
    torch.manual_seed(0)
    model = Wrap(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), kind="plain")
    x = torch.randn(5, 5, 8)
    target = torch.randn(5, 40)
    ours = per_sample_sq_norms(model, projection_loss, x, target)
    rows = explicit(model.double(), (x.double(),), target.double())
    total = torch.stack([sum(g.square().sum() for g in r.values()) for r in rows])
    torch.testing.assert_close(ours.total.double(), total, rtol=1e-4, atol=0)

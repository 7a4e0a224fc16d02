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
        elif self.kind.startswith("mha:"):
            out = self.layer(x, x, x, **MHA_OPTIONS[self.kind[4:]](x, self.layer, self.time_major))[0]
        elif self.kind == "rnn":
            out = self.layer(x)[0]
        elif self.kind == "rnn-hx":  # initial states from each sample's own data
            layer = self.layer
            first = x[0] if self.time_major else x[:, 0]  # (B, F)
            h0 = torch.tanh(first[:, :1]).expand(-1, layer.hidden_size)
            h0 = h0.unsqueeze(0).repeat(layer.num_layers * (2 if layer.bidirectional else 1), 1, 1)
            out = layer(x, (h0, 0.5 * h0) if isinstance(layer, nn.LSTM) else h0)[0]
        elif self.kind == "sequence":
            t = x.shape[1 - int(self.time_major)]
            out = self.layer(x, src_mask=nn.Transformer.generate_square_subsequent_mask(t, dtype=x.dtype),
                             is_causal=True)
        elif self.kind == "decoder":
            out = self.layer(x, x.flip(0))  # memory: the sequence reversed
        elif self.kind == "bilinear":
            out = self.layer(x, extra[0])
        else:
            out = self.layer(x)
        if self.time_major:
            out = out.transpose(0, 1)
        return out.flatten(1)


def _padding(x, layer, time_major):
    first = (x.transpose(0, 1) if time_major else x)[..., 0]  # (B, T): each sample's mask from its own data
    mask = first > 0.8
    mask[:, 0] = False  # no sample ignores all its keys
    return mask


def _causal(x, layer, time_major, dtype=torch.bool):
    t = x.shape[0] if time_major else x.shape[1]
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    return mask if dtype == torch.bool else torch.zeros(t, t, dtype=x.dtype).masked_fill(mask, float("-inf"))


def _per_head(x, layer, time_major):
    batch_first = x.transpose(0, 1) if time_major else x
    scores = torch.tanh(batch_first @ batch_first.mT).detach()  # (B, T, T) from each sample's own data
    return scores.repeat_interleave(layer.num_heads, dim=0)  # (B * heads, T, T)


#: keyword arguments of a MultiheadAttention call, from the (already time-major or not) input
MHA_OPTIONS = {
    "padding": lambda x, m, tm: {"key_padding_mask": _padding(x, m, tm), "need_weights": False},
    "bool-causal": lambda x, m, tm: {"attn_mask": _causal(x, m, tm), "need_weights": False},
    "float-causal-hint": lambda x, m, tm: {"attn_mask": _causal(x, m, tm, x.dtype), "is_causal": True,
                                           "need_weights": False},
    "padding-and-causal": lambda x, m, tm: {"attn_mask": _causal(x, m, tm), "key_padding_mask": _padding(x, m, tm)},
    "per-head-3d": lambda x, m, tm: {"attn_mask": _per_head(x, m, tm), "need_weights": False},
    "weights-per-head": lambda x, m, tm: {"need_weights": True, "average_attn_weights": False},
    "weights-averaged": lambda x, m, tm: {"need_weights": True},
}


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
for cell, batch_first in itertools.product((nn.RNN, nn.LSTM, nn.GRU), (True, False)):
    CASES[f"{cell.__name__}-initial-state-bf{batch_first}"] = case(
        cell(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first), (6, 3), time_major=not batch_first,
        kind="rnn-hx")
CASES["RNN-relu"] = case(nn.RNN(3, 4, nonlinearity="relu", batch_first=True), (6, 3), kind="rnn")
CASES["LSTM-proj-size"] = case(nn.LSTM(3, 4, proj_size=2, batch_first=True), (6, 3), kind="rnn")  # generic fallback
for batch_first, bias, kv in itertools.product((True, False), (True, False), (False, True)):
    kw = {"kdim": 5, "vdim": 5} if kv else {}
    name = f"mha-bf{batch_first}-b{bias}-kv{kv}"
    if kv:
        CASES[name] = case(nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first, **kw), (6, 8),
                           time_major=not batch_first, kind="cross", extra=(4, 5))
    else:
        CASES[name] = case(nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first), (6, 8),
                           time_major=not batch_first, kind="mha")
for option, batch_first in itertools.product(MHA_OPTIONS, (True, False)):
    CASES[f"mha-{option}-bf{batch_first}"] = case(nn.MultiheadAttention(8, 2, batch_first=batch_first), (6, 8),
                                                   time_major=not batch_first, kind=f"mha:{option}")
for batch_first, norm_first in itertools.product((True, False), (True, False)):
    CASES[f"encoder-layer-bf{batch_first}-nf{norm_first}"] = case(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first), (6, 8),
        time_major=not batch_first, kind="sequence")
CASES["decoder-layer-bfFalse"] = case(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0), (6, 8), time_major=True,
                                      kind="decoder")
# the dedicated kernels over the same grid
for stride, padding, dilation, groups, bias in itertools.product((1, 2), (0, 2, "same", "valid"), (1, 2), (1, 2),
                                                                 (True, False)):
    if padding == "same" and stride != 1:
        continue
    CASES[f"conv2d-s{stride}-p{padding}-d{dilation}-g{groups}-b{bias}"] = case(
        nn.Conv2d(2, 4, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias), (2, 7, 6))
    CASES[f"conv1d-s{stride}-p{padding}-d{dilation}-g{groups}-b{bias}"] = case(
        nn.Conv1d(2, 4, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias), (2, 9))
for bias in (True, False):
    CASES[f"linear-3d-b{bias}"] = case(nn.Linear(4, 3, bias=bias), (5, 4))
    CASES[f"linear-2d-b{bias}"] = case(nn.Linear(4, 3, bias=bias), (4,))
CASES["groupnorm"] = case(nn.GroupNorm(2, 4), (4, 5))
CASES["layernorm-2d-shape"] = case(nn.LayerNorm((3, 4)), (2, 3, 4))
CASES["instancenorm2d-affine"] = case(nn.InstanceNorm2d(3, affine=True), (3, 4, 4))
CASES["instancenorm1d-affine-running"] = case(nn.InstanceNorm1d(3, affine=True, track_running_stats=True).eval(),
                                              (3, 6))
CASES["batchnorm2d-eval"] = case(nn.BatchNorm2d(3).eval(), (3, 4, 4))
CASES["batchnorm1d-eval"] = case(nn.BatchNorm1d(3).eval(), (3,))
CASES["layernorm-no-bias"] = case(nn.LayerNorm(4, bias=False), (5, 4))
CASES["rmsnorm"] = case(nn.RMSNorm(4), (5, 4))
CASES["embedding-padding-idx"] = case(nn.Embedding(7, 3, padding_idx=0), (6,), ints=7)
CASES["embedding-long"] = case(nn.Embedding(7, 3), (40,), ints=7)
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
    sequences = kind in ("rnn", "mha", "cross", "sequence", "decoder") or kind.startswith("mha:")
    batch = shape[0] if sequences else 4  # T == B for sequences
    inputs = inputs_for(shape, extra, ints, batch, gen)
    with torch.no_grad():
        out = model(inputs if len(inputs) > 1 else inputs[0])
    target = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ours = per_sample_sq_norms(model, projection_loss, inputs if len(inputs) > 1 else inputs[0], target)
    rows = explicit(model, inputs, target)
    total = torch.stack([sum(g.square().sum() for g in r.values()) for r in rows])
    torch.testing.assert_close(ours.total.double(), total, rtol=1e-8, atol=1e-12)
    for key, norms in ours.per_layer.items():  # each module's share, MultiheadAttention's out_proj with it
        mine = [n for n in rows[0] if owner(n, ours.per_layer) == key]
        expected = torch.stack([sum(r[n].square().sum() for n in mine) for r in rows])
        torch.testing.assert_close(norms.double(), expected, rtol=1e-8, atol=1e-12)
    for n, g in ours.grad_sum.items():
        torch.testing.assert_close(g.double(), sum(r[n] for r in rows), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["LSTM-l2-biTrue-bfTrue-bTrue", "GRU-l2-biTrue-bfFalse-bTrue",
                                  "RNN-l1-biFalse-bfTrue-bFalse", "mha-padding-bfFalse", "encoder-layer-bfTrue-nfTrue"])
def test_the_generic_fallback_agrees_where_a_rule_of_its_own_exists(name):
    layer, shape, time_major, kind, extra, ints = CASES[name]
    torch.manual_seed(0)
    model = Wrap(layer.double(), time_major=time_major, kind=kind)
    x = torch.randn(shape[0], *shape, dtype=torch.float64)
    with torch.no_grad():
        target = torch.randn(model(x).shape, dtype=torch.float64)
    own = per_sample_sq_norms(model, projection_loss, x, target)
    generic = per_sample_sq_norms(model, projection_loss, x, target, fallback_force=["*"])
    torch.testing.assert_close(own.total, generic.total, rtol=1e-8, atol=1e-12)


def owner(name, keys):
    """The measured module a parameter name belongs to: the longest module path that prefixes it."""
    return max((k for k in keys if name.startswith(k + ".")), key=len)


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


def test_packed_and_unbatched_inputs_are_refused_by_name():
    from dbx.errors import UserError

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)

        def forward(self, x):
            lengths = torch.full((x.shape[0],), x.shape[1])
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
            return self.rnn(packed)[1][0]

    with pytest.raises(UserError, match=r"GRU 'rnn'.*PackedSequence"):
        per_sample_sq_norms(Packed(), projection_loss, torch.randn(3, 5, 3), torch.randn(3, 4))
    with pytest.raises(UserError, match=r"'rnn' \(GRU\).*PackedSequence"):  # the generic fallback: the same
        per_sample_sq_norms(Packed(), projection_loss, torch.randn(3, 5, 3), torch.randn(3, 4), fallback_force=["rnn"])


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

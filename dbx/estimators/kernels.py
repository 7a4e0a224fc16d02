"""Per-sample squared gradient norms of single layers, from their inputs and output gradients.

A layer's per-sample gradient is a function of two things autograd already has during the
training step: the layer's input ``a_i`` (saved by autograd anyway) and the gradient ``b_i`` that
reaches the layer's output. These kernels turn them into ``||g_i||^2`` without materialising
per-sample gradients where the algebra allows.

Linear and convolution (the input seen as patches, one row per output position): the
per-sample weight gradient is ``G_i = sum_t b_it a_it^T`` over the sample's positions t, and

    ||G_i||_F^2 = sum_{t,s} (a_it . a_is) (b_it . b_is)          "ghost norm" (Gram form)
               = ||b_i^T a_i||_F^2                             explicit per-sample product

For T positions, I inputs and O outputs (per group) the Gram form costs T^2 (I + O) per sample
and the explicit product T I O; each call picks the cheaper for its shapes (Li et al., "Large
language models can be strong differentially private learners", ICLR 2022; Bu et al.,
"Differentially private optimization on large model at small cost", ICML 2023). With a single
position this is ``||a_i||^2 ||b_i||^2`` (Goodfellow, "Efficient per-example gradient
computations", 2015). The bias gradient is ``sum_t b_it``.

Convolutions never unfold their input (on CPU the copy alone costs several times the layer's
weight gradient). The Gram form builds the Gram matrix of the unpadded input *pixels*, X^T X
(for a strided convolution one per stride phase, ``_phases``), and adds up its shifted blocks, one
per kernel tap and separably per spatial dimension, into the Gram matrix of the patches (k^2 times
less work than the patches' Gram). The explicit form gets all per-sample weight gradients of a
chunk of samples as the weight gradient of one convolution whose groups are samples x groups. In
that form the per-sample gradients' sum is the batch weight gradient: the hooks can let the kernel
supply it ("fused weight gradients", see ``Kernel``) so that autograd does not compute it again.
Any stride, padding (modes and "same"), dilation and groups.

Normalisation layers (BatchNorm, GroupNorm, LayerNorm, RMSNorm, InstanceNorm): the per-sample
gradient of the affine weight is ``sum_positions b_i * xhat_i`` and of the bias ``sum_positions b_i``,
where ``xhat`` is the normalised input computed exactly as the layer's forward did (batch statistics
in BatchNorm's training mode, read from autograd's saved mean and inverse std when available). For
BatchNorm in training mode these per-sample terms are the rows of the batch gradient: ``b_i``
already carries the cross-sample terms autograd propagated through the batch statistics, and the
terms sum exactly to the batch gradient (so S1 and S2 agree). This is dbx's definition, not the
DiveBatch authors' code, which puts BatchNorm in eval mode first and so uses running statistics
for these terms; docs/algorithm.md says where the two differ.

Embedding: the per-sample gradient is ``sum_t onehot(idx_it) b_it^T``; its squared norm is
``sum_{t,s} [idx_it == idx_is] (b_it . b_is)``, evaluated as a Gram form for short sequences and by
sorting the (sample, token) keys and summing segments for long ones.

All kernels accumulate in float32 whatever the input dtype (bf16/fp16 squares overflow; float64
models stay in float64), sum squares with ``square().sum()`` (cascade summation), work on chunks of
samples so that their scratch memory stays bounded (``CHUNK_ELEMENTS``), and never synchronise
with the device.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Kernel", "kernel_for", "supported_types", "CHUNK_ELEMENTS", "sum_outer_sq_norms", "use_path", "path_of",
           "PATHS"]

#: The code paths the kernels have: "cpu" and "cuda" differ in chunk sizes, in the cost model's
#: per-element constants and in how some sums are laid out (few large operations on "cuda", where
#: each one is a kernel launch; cache-sized pieces on "cpu"). "auto" takes the tensors' device type.
PATHS = ("auto", "cpu", "cuda")

_chosen = threading.local()  # .path: the path ``use_path`` set on this thread, or None


def path_of(device: torch.device) -> str:
    """The code path the kernels take for tensors on ``device``: its type, unless ``use_path`` chose one.

    Choosing lets the CUDA path run (and be tested) on a CPU: same arithmetic, laid out as on a GPU.
    """
    return getattr(_chosen, "path", None) or device.type


@contextlib.contextmanager
def use_path(path: str):
    """Within the block, on this thread, the kernels take code path ``path`` ("auto": the device's)."""
    check_path(path)
    previous = getattr(_chosen, "path", None)
    _chosen.path = None if path == "auto" else path
    try:
        yield
    finally:
        _chosen.path = previous

#: Upper bound on the scratch elements (float32) one kernel call allocates at a time, per device
#: type; larger batches are processed in chunks of samples. On CPU small chunks stay in cache
#: (with chunks of 4M elements, what the fused explicit form of ResNet-18's layer2 adds to the
#: batch weight gradient was 20% to 2.3x larger than with chunks of 1M: benchmarks/estimator_kernels.py);
#: on a GPU large chunks keep it busy, and each chunk repeats every launch of the kernel (64M
#: elements, 256 MB: ResNet-18's layers and groups of layers at B = 128 take one chunk each).
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}

#: "auto" picks the cheaper of the two forms per call; tests force one or the other.
FORMS = ("auto", "ghost", "explicit")


def _sq(x: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """Squared 2-norm over ``dim``, in float32 at least.

    Over trailing dimensions: the 2-norms of blocks of ``SQ_BLOCK`` elements, squared and summed.
    ``linalg.vector_norm`` alone accumulates naively on CPU (all-equal entries lose 2e-4,
    relative, over 256K elements), ``vecdot``/``square().sum()`` sum in cascade but run at 40% of
    its speed; blocks of 1024 keep its speed and the error under 1e-6
    (``benchmarks/estimator_kernels.py``). Other dimensions use ``square().sum()``.
    """
    x = _f32(x)
    dims = sorted(d % x.dim() for d in ((dim,) if isinstance(dim, int) else dim))
    if dims != list(range(x.dim() - len(dims), x.dim())):
        return x.square().sum(dim)
    flat = x.flatten(dims[0]) if len(dims) > 1 else x
    size = flat.shape[-1]
    if size <= SQ_BLOCK:
        return torch.linalg.vector_norm(flat, dim=-1).square()
    whole = size - size % SQ_BLOCK
    blocks = flat[..., :whole].unflatten(-1, (-1, SQ_BLOCK))
    total = torch.linalg.vector_norm(blocks, dim=-1).square().sum(-1)
    if whole < size:
        tail = flat[..., whole:]
        total = total + torch.linalg.vecdot(tail, tail)
    return total


#: elements per block in ``_sq``
SQ_BLOCK = 1024


def _acc(x: Tensor) -> torch.dtype:
    """The accumulation dtype for ``x``: float32, or float64 for float64 tensors."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _f32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is in a lower precision (float64 stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _chunks(n: int, per_sample: int, device: torch.device) -> list[tuple[int, int]]:
    size = max(1, CHUNK_ELEMENTS.get(path_of(device), 1 << 22) // max(1, per_sample))
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def sum_outer_sq_norms(a: Tensor, g: Tensor, form: str = "auto") -> Tensor:
    """``||sum_t g[n, t] a[n, t]^T||_F^2`` for each n, in float32.

    ``a`` is (N, T, I) and ``g`` is (N, T, O); either may be a strided view. ``form`` is "ghost"
    (Gram matrices, T^2 (I + O) work per row), "explicit" (the I x O product, T I O work) or
    "auto" (the cheaper of the two).
    """
    _, t, i = a.shape
    o = g.shape[-1]
    if t == 1:
        return _sq(a[:, 0], 1) * _sq(g[:, 0], 1)
    if form == "auto":
        form = outer_forms_used(t, i, o)
    a, g = _f32(a), _f32(g)
    if form == "ghost":
        gram_a = torch.bmm(a, a.mT)
        gram_g = torch.bmm(g, g.mT)
        return torch.linalg.vecdot(gram_a.flatten(1), gram_g.flatten(1))
    return _sq(torch.bmm(g.mT, a), (1, 2))


def _outer_cost(t: int, i: int, o: int) -> int:
    """Scratch elements per row of ``sum_outer_sq_norms`` with form "auto" (float32 copies included)."""
    return t * (i + o) + min(2 * t * t, i * o)


# --------------------------------------------------------------------------------------------
# Kernels. ``capture(module, x, output)`` runs in the forward hook and returns what the backward
# needs (usually just the input, which autograd keeps alive anyway); ``sq_norms(module, ctxs,
# grads, form, fused)`` gets one ctx and one output gradient per call of the module in the forward
# pass and returns the (B,) squared norms (float32, or float64 for a float64 model) of the
# per-sample gradient of the module's trainable parameters (weight and bias together; several calls
# add their gradients).
#
# Fused weight gradients. In the explicit form the per-sample weight gradients are computed
# anyway, and their sum is the batch weight gradient, which autograd would compute a second time.
# For kernels with a ``plan``, the hooks may run a call with the weight detached (autograd then
# skips its weight gradient) and pass ``fused[k] = True``: the kernel adds that call's summed
# per-sample gradients to ``module.weight.grad`` itself, exactly as autograd would have.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    name: str
    types: tuple[type, ...]
    sq_norms: Callable[..., Tensor]
    capture: Callable[[nn.Module, Tensor, Tensor], object] = lambda module, x, output: x
    param_names: tuple[str, ...] = ("weight", "bias")
    #: ``plan(module, x, form, fused=True)`` -> "explicit" when a call with input ``x`` whose weight
    #: gradient the kernel would supply is cheaper in the explicit form; None for kernels that never fuse.
    plan: Callable[..., str] | None = None


def accumulate_grad(param: Tensor, grad: Tensor) -> None:
    """Add ``grad`` into ``param.grad`` as autograd's gradient accumulation does."""
    grad = grad.reshape(param.shape).to(param.dtype)
    if param.grad is None:
        param.grad = grad if param.is_contiguous() else torch.empty_like(param).copy_(grad)
    else:
        param.grad.add_(grad)


def _add_batch_sum(total: Tensor | None, rows: Tensor) -> Tensor:
    """``total + rows.sum(0)`` for (b, size) ``rows``, in place when ``total`` exists: one
    matrix-vector product reads the rows once (on CPU 1.6x to 3x faster than a sum and an add:
    ``benchmarks/estimator_kernels.py``)."""
    if total is None:
        total = rows.new_zeros(rows.shape[1])
    return total.addmv_(rows.mT, rows.new_ones(rows.shape[0]))


def _trainable(module: nn.Module, name: str) -> bool:
    p = module._parameters.get(name)
    return p is not None and p.requires_grad


def _linear_positions(x: Tensor) -> int:
    return math.prod(x.shape[1:-1]) if x.dim() > 1 else 1  # shape arithmetic: indexing would be an operation


def _linear_plan(module: nn.Linear, x: Tensor, form: str, fused: bool = False) -> str:
    """The form for a call with input ``x``; ``fused``: if explicit, it would supply the weight
    gradient (costs as for convolutions: ``conv_forms_cost``)."""
    t = _linear_positions(x)
    if t == 1:
        return "rank-one"
    if form != "auto":
        return form
    i, o = module.in_features, module.out_features
    if not fused:
        return outer_forms_used(t, i, o)
    return "ghost" if t * t * (i + o) <= i * o * FUSED_ELEMENT_MACS.get(path_of(x.device), 64) else "explicit"


def _linear_sq_norms(module: nn.Linear, xs: list[Tensor], gs: list[Tensor], form: str,
                     fused: list[bool] | None = None) -> Tensor:
    n = gs[0].shape[0]
    total = None
    if _trainable(module, "weight"):
        if fused and any(fused):
            total = _linear_explicit(module, xs, gs, fused)
        else:
            a = _cat([x.reshape(n, -1, x.shape[-1]) for x in xs], 1)  # (B, T, in)
            g = _cat([y.reshape(n, -1, y.shape[-1]) for y in gs], 1)  # (B, T, out)
            t, i, o = a.shape[1], a.shape[2], g.shape[2]
            if t == 1:
                total = _sq(a[:, 0], 1) * _sq(g[:, 0], 1)
            else:
                parts = [sum_outer_sq_norms(a[s:e], g[s:e], form) for s, e in _chunks(n, _outer_cost(t, i, o), a.device)]
                total = _cat(parts, 0)
    if _trainable(module, "bias"):
        gb = None
        for y in gs:
            part = y.reshape(n, -1, y.shape[-1]).sum(1, dtype=_acc(y))
            gb = part if gb is None else gb + part
        bias = _sq(gb, 1)
        total = bias if total is None else total + bias
    return total if total is not None else gs[0].new_zeros(n, dtype=_acc(gs[0]))


def _linear_explicit(module: nn.Linear, xs: list[Tensor], gs: list[Tensor], fused: list[bool]) -> Tensor:
    """Per-sample weight gradients g^T a of every call, summed over calls; fused calls' batch sums
    go to ``module.weight.grad``."""
    n, i, o = gs[0].shape[0], module.in_features, module.out_features
    t = max(_linear_positions(x) for x in xs)
    parts, batch = [], None
    for s, e in _chunks(n, 2 * i * o + t * (i + o), xs[0].device):
        per_sample = None
        for x, y, f in zip(xs, gs, fused, strict=True):
            a = _f32(x[s:e].reshape(e - s, -1, i))
            g = _f32(y[s:e].reshape(e - s, -1, o))
            grads = torch.bmm(g.mT, a)  # (b, out, in)
            per_sample = grads if per_sample is None else per_sample + grads
            if f:
                batch = _add_batch_sum(batch, grads.view(e - s, -1))
        parts.append(_sq(per_sample, (1, 2)))
    if batch is not None:
        accumulate_grad(module.weight, batch)
    return _cat(parts, 0)


def _conv_geometry(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """kernel, dilation, stride as 2-d tuples (Conv1d is a Conv2d of height 1)."""
    if isinstance(module, nn.Conv1d):
        return (1, module.kernel_size[0]), (1, module.dilation[0]), (1, module.stride[0])
    return tuple(module.kernel_size), tuple(module.dilation), tuple(module.stride)  # type: ignore[return-value]


def _unfold(module: nn.Module, x: Tensor) -> Tensor:
    """The input patches of a Conv1d/Conv2d: (B, C_in * prod(kernel), positions)."""
    kernel, dilation, stride = _conv_geometry(module)
    x, pad = _conv_padding(module, x)
    padding = (0, *pad) if isinstance(module, nn.Conv1d) else pad
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
    if kernel == (1, 1) and stride == (1, 1) and not any(padding):
        return x.flatten(2)
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


def _conv_padding(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Apply the padding a plain zero-padded convolution cannot express; return the rest.

    Non-zero padding modes and string paddings ("same" may pad asymmetrically) are applied to
    ``x``; an integer zero padding is returned, per spatial dimension, for the caller to apply.
    """
    dims = x.dim() - 2
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * dims
    if isinstance(module.padding, str):
        if any(module._reversed_padding_repeated_twice):
            x = F.pad(x, module._reversed_padding_repeated_twice)
        return x, (0,) * dims
    return x, tuple(module.padding)


def _total_padding(module: nn.Module, dims: int) -> list[int]:
    """Both sides' padding per spatial dimension, whatever the padding's form."""
    pads = module._reversed_padding_repeated_twice  # (last dim left, right, ..., first dim left, right)
    return [pads[2 * (dims - 1 - d)] + pads[2 * (dims - 1 - d) + 1] for d in range(dims)]


def _conv_out_spatial(module: nn.Module, in_spatial: Sequence[int]) -> tuple[int, ...]:
    total = _total_padding(module, len(in_spatial))
    return tuple((n + p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                 zip(in_spatial, total, module.dilation, module.kernel_size, module.stride, strict=True))


#: The cost, in multiply-adds, of one element of the per-sample weight gradients in the explicit
#: form when their batch sum replaces autograd's weight gradient ("fused"): the multiply-adds then
#: cost nothing extra, but B x (weight size) elements are written, summed and squared, which is
#: memory-bound. Measured per device type with ``python benchmarks/estimators.py --forms``: on a
#: 1-thread CPU the break-even values of ResNet-18's contested layers were 50-115; on an H200 they
#: scattered from 4 to 5,000, and 64 still picked the faster form for every ResNet-18 convolution.
FUSED_ELEMENT_MACS = {"cpu": 64, "cuda": 64}

#: The same for pointwise (1x1) convolutions, whose per-sample gradients are one batched matrix
#: product (``_pointwise_sample_grads``) rather than a grouped convolution. On a 1-thread CPU the
#: break-even values were 4-6 for ResNet-18's strided 1x1 shortcuts (``benchmarks/estimators.py
#: --forms``) and 12-29 for 1x1 convolutions of 64 to 2048 channels (a one-off run); 24 picked the
#: faster form for every one of them. CUDA keeps the value measured for all convolutions.
FUSED_POINTWISE_ELEMENT_MACS = {"cpu": 24, "cuda": 64}


def conv_forms_cost(module: nn.Module, in_spatial: Sequence[int],
                    out_spatial: Sequence[int] | None = None, device_type: str = "cpu") -> dict[str, int]:
    """Multiply-adds per sample of the forms for one call of a Conv1d/Conv2d.

    ghost: the Gram matrices of the input pixels of each stride phase, X^T X (Np^2 C/G per group
    and phase), whose shifted blocks add up to the Gram matrix of the input patches (T^2 k^2), and
    the output gradients' Gram matrix (T^2 O/G); explicit: the per-sample weight gradient
    (T C/G k^2 O/G per group); explicit_fused: what the explicit form adds to the step when it
    also supplies the batch weight gradient (``FUSED_ELEMENT_MACS`` per per-sample gradient element,
    ``FUSED_POINTWISE_ELEMENT_MACS`` for 1x1 convolutions).
    """
    out_spatial = tuple(out_spatial or _conv_out_spatial(module, in_spatial))
    groups = module.groups
    cg, og = module.in_channels // groups, module.out_channels // groups
    positions, taps = math.prod(out_spatial), math.prod(module.kernel_size)
    spatial, pad = _padded_geometry(module, tuple(in_spatial))
    phases = _phases(spatial, pad, tuple(module.kernel_size), tuple(module.dilation), tuple(module.stride),
                     out_spatial)
    pixel_grams = sum(math.prod(phase.spatial) ** 2 for phase in phases)
    per_element = (FUSED_POINTWISE_ELEMENT_MACS if _pointwise(tuple(module.kernel_size), pad) else FUSED_ELEMENT_MACS)
    return {
        "ghost": groups * (pixel_grams * cg + positions * positions * (og + taps)),
        "explicit": groups * positions * cg * taps * og,
        "explicit_fused": groups * cg * taps * og * per_element.get(device_type, 64),
    }


def _padded_geometry(module: nn.Module, in_spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The spatial size after ``_conv_padding`` and the zero padding left to the kernels."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        grown = tuple(n + p for n, p in zip(in_spatial, _total_padding(module, len(in_spatial)), strict=True))
        return grown, (0,) * len(in_spatial)
    return in_spatial, tuple(module.padding)


def _conv_plan(module: nn.Module, x: Tensor, form: str, fused: bool = False) -> str:
    """The form for a call with input ``x``; ``fused``: if explicit, it would supply the weight gradient."""
    if form != "auto":
        return form
    costs = conv_forms_cost(module, x.shape[2:], device_type=path_of(x.device))
    explicit = costs["explicit_fused" if fused else "explicit"]
    return "ghost" if costs["ghost"] <= explicit else "explicit"


@dataclass(frozen=True)
class _Phase:
    """The input pixels of one stride phase and the kernel taps that read them.

    Per spatial dimension, pixel ``start + stride * q`` of the (unpadded) input is pixel ``q`` of
    the phase, and a tap with offset ``o`` reads phase pixel ``out + o`` for output position
    ``out``. ``taps``: per dimension and tap, (output slice, phase pixel slice) of the output
    positions whose pixel is inside the image, a tap covering every output position first.
    """

    pixels: tuple[slice, ...]
    spatial: tuple[int, ...]
    offsets: tuple[tuple[int, ...], ...]
    taps: tuple[tuple[tuple[slice, slice], ...], ...]


@functools.lru_cache(maxsize=256)
def _phases(spatial: tuple[int, ...], pad: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...],
            stride: tuple[int, ...], out_spatial: tuple[int, ...]) -> tuple[_Phase, ...]:
    """The stride phases of a convolution's input that some tap reads (one when the stride is 1).

    Output position ``out`` reads pixel ``out * stride + tap * dilation - pad``: with stride s a
    tap only ever reads pixels of one residue modulo s, so two patches share pixels only within a
    phase, and the Gram matrices of the phases' pixels (s^2 times less work than all pixels'
    Gram for a 2-d stride of 2) are all the Gram form needs.
    """
    per_dim = []
    for size, p, k, d, st, m in zip(spatial, pad, kernel, dilation, stride, out_spatial, strict=True):
        by_residue: dict[int, list[int]] = {}
        for tap in range(k):
            offset = tap * d - p
            by_residue.setdefault(offset % st, []).append(offset // st)
        options = []
        for residue, offsets in sorted(by_residue.items()):
            n = len(range(residue, size, st))
            taps = [(slice(max(0, -o), min(m, n - o)), slice(max(0, -o) + o, min(m, n - o) + o)) for o in offsets]
            taps = sorted((t for t in taps if t[0].start < t[0].stop), key=lambda t: t[0] != slice(0, m))
            if taps:
                options.append((slice(residue, None, st), n, tuple(offsets), tuple(taps)))
        per_dim.append(options)
    return tuple(_Phase(*(tuple(c[i] for c in choice) for i in range(4))) for choice in itertools.product(*per_dim))


def _add_taps(gram: Tensor, phase: _Phase, out_spatial: tuple[int, ...], into: Tensor | None) -> Tensor:
    """Add one phase's share of the patch Gram (N, *out, *out), from its pixel Gram, to ``into``
    (or return it). The taps are separable: one spatial dimension at a time, each tap adds a
    shifted block (for a 3x3 kernel, 3 + 3 block additions instead of 9), the first from a copy
    when it covers every output position (``benchmarks/estimator_kernels.py``)."""
    dims = len(out_spatial)
    for d, taps in enumerate(phase.taps):
        def index(sl: slice, d: int = d) -> tuple[slice, ...]:
            rest = (slice(None),) * (dims - 1 - d)
            return (slice(None), *(slice(None),) * d, sl, *rest, *(slice(None),) * d, sl, *rest)

        target = into if d == dims - 1 else None
        for out_slice, pixel_slice in taps:
            block = gram[index(pixel_slice)]
            if target is None:
                if out_slice == slice(0, out_spatial[d]):
                    target = block.clone(memory_format=torch.contiguous_format)
                    continue
                shape = list(gram.shape)
                shape[1 + d] = shape[1 + dims + d] = out_spatial[d]
                target = gram.new_zeros(shape)
            target[index(out_slice)].add_(block)
        gram = target
    return gram


def _conv_ghost(module: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """Squared norms of the per-sample weight gradients of one call, from Gram matrices.

    (a_t . a_s) over input patches t, s is the sum over kernel taps of the pixel Gram X^T X at the
    tapped pixels: no unfolding, and k^2 times less work than the Gram matrix of the patches. The
    Gram matrices are taken over the unpadded pixels only (a padding pixel is zero, and so are its
    products: on small feature maps padding is most of the pixels) and, for strided convolutions,
    per stride phase (``_phases``). Each tap adds the block of output positions whose tapped
    pixels lie inside the image.
    """
    n, groups = x.shape[0], module.groups
    c_in, c_out = module.in_channels, module.out_channels
    cg, og = c_in // groups, c_out // groups
    out_spatial = tuple(g.shape[2:])
    positions = math.prod(out_spatial)
    x, pad = _conv_padding(module, x)
    kernel, dilation, stride = tuple(module.kernel_size), tuple(module.dilation), tuple(module.stride)
    phases = _phases(tuple(x.shape[2:]), pad, kernel, dilation, stride, out_spatial)
    one_reduction = path_of(x.device) in TAPS_IN_ONE_REDUCTION
    # the largest phase Gram, and its padded copy when the taps are one reduction
    gram = max((math.prod(p.spatial) ** 2 * (4 if one_reduction else 1) for p in phases), default=0)
    parts = []
    for s, e in _chunks(n, c_in * math.prod(x.shape[2:]) + groups * (gram + 3 * positions * positions), x.device):
        b = e - s
        gram_a = None
        xc = _rows(x, s, e, n)
        grams = _phase_grams(_f32(xc), stride, groups) if one_reduction and len(phases) > 1 else None
        split = _split_phases(_f32(xc), stride) if len(phases) > 1 and grams is None else None
        for phase in phases:
            if grams is not None:  # every phase's pixel Gram came from one product
                gram_x = grams[_phase_index(phase, stride)]
                taps = _tapped_sum(gram_x, phase.offsets, out_spatial)
                gram_a = taps if gram_a is None else gram_a.add_(taps)
                continue
            if split is not None:  # a view of the chunk's phases, copied once
                pixels = split[(slice(None), *(p.start for p in phase.pixels))].reshape(b * groups, cg, -1)
            else:
                pixels = _f32(x[(slice(s, e), slice(None), *phase.pixels)]).reshape(b * groups, cg, -1)
            gram_x = torch.bmm(pixels.mT, pixels).view(b * groups, *phase.spatial, *phase.spatial)
            if one_reduction:
                taps = _tapped_sum(gram_x, phase.offsets, out_spatial)
                gram_a = taps if gram_a is None else gram_a.add_(taps)
            else:
                gram_a = _add_taps(gram_x, phase, out_spatial, gram_a)
        gs = _f32(_rows(g, s, e, n)).reshape(b * groups, og, positions)
        gram_g = torch.bmm(gs.mT, gs)
        if gram_a is None:  # no tap reads a pixel of the input
            parts.append(gs.new_zeros(b))
            continue
        parts.append(torch.linalg.vecdot(gram_a.reshape(b * groups, -1), gram_g.flatten(1)).view(b, groups).sum(1))
    return _cat(parts, 0)


def _rows(t: Tensor, s: int, e: int, n: int) -> Tensor:
    """Rows s:e of ``t``, which has n rows: ``t`` itself when that is all of them (no operation)."""
    return t if s == 0 and e == n else t[s:e]


def _phase_grams(x: Tensor, stride: tuple[int, ...], groups: int) -> Tensor | None:
    """(phases, N * groups, *phase, *phase): the pixel Gram matrices of every stride phase of ``x``
    (N, C, *spatial), phases in row-major order of their residues, from one copy and one batched
    product (the CUDA path: few launches); None unless each size divides by its stride."""
    spatial = x.shape[2:]
    if any(size % st for size, st in zip(spatial, stride, strict=True)):
        return None
    dims, (n, c) = len(spatial), x.shape[:2]
    shape = [v for size, st in zip(spatial, stride, strict=True) for v in (size // st, st)]
    order = (*(3 + 2 * d for d in range(dims)), 0, 1, *(2 + 2 * d for d in range(dims)))
    phased = x.reshape(n, c, *shape).permute(order).reshape(math.prod(stride) * n * groups, c // groups, -1)
    small = tuple(size // st for size, st in zip(spatial, stride, strict=True))
    return torch.bmm(phased.mT, phased).view(math.prod(stride), n * groups, *small, *small)


def _phase_index(phase: _Phase, stride: tuple[int, ...]) -> int:
    """The position of ``phase`` in ``_phase_grams``' row-major order of residues."""
    index = 0
    for sl, st in zip(phase.pixels, stride, strict=True):
        index = index * st + sl.start
    return index


def _split_phases(x: Tensor, stride: tuple[int, ...]) -> Tensor | None:
    """(N, *stride, C, *spatial / stride): the stride phases of ``x`` (N, C, *spatial) in one copy
    (on CPU 1.5x to 3x faster than one strided copy per phase: ``benchmarks/estimator_kernels.py``),
    or None unless each size divides by its stride."""
    spatial = x.shape[2:]
    if any(size % st for size, st in zip(spatial, stride, strict=True)):
        return None
    dims = len(spatial)
    shape = [v for size, st in zip(spatial, stride, strict=True) for v in (size // st, st)]
    order = (0, *(3 + 2 * d for d in range(dims)), 1, *(2 + 2 * d for d in range(dims)))
    return x.reshape(*x.shape[:2], *shape).permute(order).contiguous()


#: Device types on which the tapped blocks of a pixel Gram are summed as one strided reduction over
#: a zero-padded copy (one kernel launch, where launches are what a GPU step waits for) instead of
#: block by block (a CPU runs the latter three times faster).
TAPS_IN_ONE_REDUCTION = {"cuda"}


def _tapped_sum(gram: Tensor, offsets: tuple[tuple[int, ...], ...], out_spatial: tuple[int, ...]) -> Tensor:
    """The patch Gram (N, *out, *out) of one phase from its pixel Gram (N, *spatial, *spatial):
    the tapped blocks of a zero-padded copy, as one strided view summed over the taps (per
    dimension the offsets are evenly spaced)."""
    dims = len(offsets)
    spatial = gram.shape[1:1 + dims]
    low = [max(0, -o[0]) for o in offsets]
    high = [max(0, m - 1 + o[-1] - (size - 1)) for o, m, size in zip(offsets, out_spatial, spatial, strict=True)]
    if any(low) or any(high):
        gram = F.pad(gram, [v for d in reversed(range(dims)) for v in (low[d], high[d])] * 2)
    strides = gram.stride()
    first, second = strides[1:1 + dims], strides[1 + dims:]
    steps = [o[1] - o[0] if len(o) > 1 else 1 for o in offsets]
    start = gram.storage_offset() + sum((o[0] + lo) * (s1 + s2) for o, lo, s1, s2 in
                                        zip(offsets, low, first, second, strict=True))
    taps = gram.as_strided((*(len(o) for o in offsets), gram.shape[0], *out_spatial, *out_spatial),
                           (*(st * (s1 + s2) for st, s1, s2 in zip(steps, first, second, strict=True)),
                            strides[0], *first, *second), start)
    return taps.sum(tuple(range(dims)))


def _conv_explicit(module: nn.Module, xs: list[Tensor], gs: list[Tensor], fused: list[bool]) -> Tensor:
    """Squared norms of the per-sample weight gradients, computed explicitly.

    All per-sample gradients of a chunk at once, as the weight gradient of one convolution with
    the samples stacked along the channels (groups = samples x groups): no unfolding. Several calls
    add their per-sample gradients; the batch sums of fused calls go to ``module.weight.grad``.
    """
    n, groups = gs[0].shape[0], module.groups
    c_in, c_out = module.in_channels, module.out_channels
    cg = c_in // groups
    kernel, stride, dilation = tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)
    prepared = [_conv_padding(module, x) for x in xs]
    weight_grad = torch.nn.grad.conv1d_weight if xs[0].dim() == 3 else torch.nn.grad.conv2d_weight
    size = c_out * cg * math.prod(kernel)
    scratch = max(math.prod(x.shape[1:]) + math.prod(g.shape[1:]) for (x, _), g in zip(prepared, gs, strict=True))  # float32 copies
    parts, batch = [], None
    for s, e in _chunks(n, size * (2 if len(xs) > 1 else 1) + scratch, xs[0].device):
        b = e - s
        per_sample = None
        for (x, pad), g, f in zip(prepared, gs, fused, strict=True):
            if _pointwise(kernel, pad):
                grads = _pointwise_sample_grads(x[s:e], g[s:e], stride, groups)
            else:
                xc = _f32(x[s:e]).reshape(1, b * c_in, *x.shape[2:])
                gc = _f32(g[s:e]).reshape(1, b * c_out, *g.shape[2:])
                grads = weight_grad(xc, (b * c_out, cg, *kernel), gc, stride=stride, padding=pad,
                                    dilation=dilation, groups=b * groups).view(b, size)
            per_sample = grads if per_sample is None else per_sample + grads
            if f:
                batch = _add_batch_sum(batch, grads)
        parts.append(_sq(per_sample, 1))
    if batch is not None:
        accumulate_grad(module.weight, batch)
    return _cat(parts, 0)


def _pointwise(kernel: tuple[int, ...], pad: tuple[int, ...]) -> bool:
    """A 1x1 (or length-1) convolution without zero padding: its patches are input pixels."""
    return all(k == 1 for k in kernel) and not any(pad)


def _pointwise_sample_grads(x: Tensor, g: Tensor, stride: tuple[int, ...], groups: int) -> Tensor:
    """(b, weight size) per-sample weight gradients of a pointwise convolution: one batched matrix
    product of the output gradients with the pixels the stride keeps (on CPU 1.8x to 13x faster
    than the per-sample grouped convolution's weight gradient: ``benchmarks/estimator_kernels.py``)."""
    b = g.shape[0]
    kept = x[(slice(None), slice(None), *(slice(None, None, st) for st in stride))]
    positions = math.prod(g.shape[2:])
    a = _f32(kept).reshape(b * groups, -1, positions)  # (b * groups, C / groups, T): a copy only when strided
    y = _f32(g).reshape(b * groups, -1, positions)  # (b * groups, O / groups, T)
    return torch.bmm(y, a.mT).view(b, -1)  # weight layout (O, C / groups)


def _conv_sq_norms(module: nn.Module, xs: list[Tensor], gs: list[Tensor], form: str,
                   fused: list[bool] | None = None) -> Tensor:
    n = gs[0].shape[0]
    c_out = module.out_channels
    fused = fused or [False] * len(xs)
    total = None
    if _trainable(module, "weight"):
        plans = {_conv_plan(module, x, form) for x in xs}
        if any(fused) or plans == {"explicit"}:
            total = _conv_explicit(module, xs, gs, fused)
        elif len(xs) == 1:
            total = _conv_ghost(module, xs[0], gs[0])
        else:
            total = _conv_weight_sq_norms_concat(module, xs, gs, form)
    if _trainable(module, "bias"):
        gb = None
        for y in gs:
            part = y.reshape(n, c_out, -1).sum(-1, dtype=_acc(y))
            gb = part if gb is None else gb + part
        bias = _sq(gb, 1)
        total = bias if total is None else total + bias
    return total if total is not None else gs[0].new_zeros(n, dtype=_acc(gs[0]))


def _conv_weight_sq_norms_concat(module: nn.Module, xs: list[Tensor], gs: list[Tensor], form: str) -> Tensor:
    """A convolution called several times in one forward, in the Gram form: unfold every call's
    input and treat the calls' positions as the positions of one call (their gradients add)."""
    n, groups, c_out = gs[0].shape[0], module.groups, module.out_channels
    g3 = [y.reshape(n, c_out, -1) for y in gs]
    i = module.in_channels // groups * math.prod(module.kernel_size)
    o = c_out // groups
    t = sum(y.shape[-1] for y in g3)
    parts = []
    for s, e in _chunks(n, i * t + groups * _outer_cost(t, i, o), xs[0].device):
        b = e - s
        a = _cat([_unfold(module, x[s:e]) for x in xs], -1).reshape(b * groups, i, t).mT
        g = _cat([y[s:e] for y in g3], -1).reshape(b * groups, o, t).mT
        parts.append(sum_outer_sq_norms(a, g, form).view(b, groups).sum(1))
    return _cat(parts, 0)


def _channel_affine(module: nn.Module, xhats: list[Tensor], gs: list[Tensor]) -> Tensor:
    """Normalisation with per-channel affine over dim 1: (B, C, *)."""
    n = gs[0].shape[0]
    c = gs[0].shape[1]
    gw = gb = None
    for xhat, y in zip(xhats, gs, strict=True):
        y3 = _f32(y.reshape(n, c, -1))
        if _trainable(module, "weight"):
            w = torch.linalg.vecdot(y3, xhat.reshape(n, c, -1))
            gw = w if gw is None else gw + w
        if _trainable(module, "bias"):
            b = y3.sum(-1)
            gb = b if gb is None else gb + b
    return _weight_and_bias_sq(gw, gb, n, gs[0])


def _weight_and_bias_sq(gw: Tensor | None, gb: Tensor | None, n: int, like: Tensor) -> Tensor:
    """Per-sample ||g_weight||^2 + ||g_bias||^2 of an affine normalisation (either may be frozen)."""
    total = torch.zeros(n, dtype=_acc(like), device=like.device)
    if gw is not None:
        total = total + _sq(gw, 1)
    if gb is not None:
        total = total + _sq(gb, 1)
    return total


def _feature_affine(module: nn.Module, xhats: list[Tensor], gs: list[Tensor], features: int) -> Tensor:
    """Normalisation with an affine over the trailing ``features`` elements: (B, *, *shape)."""
    n = gs[0].shape[0]
    gw = gb = None
    for xhat, y in zip(xhats, gs, strict=True):
        y3 = _f32(y.reshape(n, -1, features))
        if _trainable(module, "weight"):  # a product and a sum: on CPU 10x faster than einsum's bmm
            w = (y3 * xhat.reshape(n, -1, features)).sum(1)
            gw = w if gw is None else gw + w
        if _trainable(module, "bias"):
            b = y3.sum(1)
            gb = b if gb is None else gb + b
    return _weight_and_bias_sq(gw, gb, n, gs[0])


#: autograd nodes of batch norm whose saved results 1 and 2 are the batch mean and inverse std
_BN_NODES = ("NativeBatchNormBackward0", "CudnnBatchNormBackward0")


def _batchnorm_capture(module: nn.Module, x: Tensor, output: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The input and the statistics the forward normalised with (mean, inverse std per channel)."""
    if not (module.training or (module.running_mean is None and module.running_var is None)):
        return x, None, None  # running statistics, read at backward time (eval mode does not update them)
    node = output.grad_fn
    if type(node).__name__ in _BN_NODES and getattr(node, "_saved_training", False):
        mean, invstd = node._saved_result1, node._saved_result2  # kept by autograd for its own backward
        if mean.numel() == x.shape[1] and invstd.numel() == x.shape[1]:
            return x, mean, invstd
    var, mean = torch.var_mean(_f32(x).transpose(0, 1).reshape(x.shape[1], -1), dim=1, correction=0)
    return x, mean, torch.rsqrt(var + module.eps)


def _batchnorm_sq_norms(module: nn.Module, ctxs: list, gs: list[Tensor], form: str,
        fused: list[bool] | None = None) -> Tensor:
    # per sample i and channel c: dL/dweight = invstd_c * sum_s b * (x - mean_c), dL/dbias = sum_s b
    n = gs[0].shape[0]
    gw = gb = None
    for (x, mean, invstd), y in zip(ctxs, gs, strict=True):
        if mean is None:
            mean, invstd = module.running_mean, torch.rsqrt(_f32(module.running_var) + module.eps)
        w, b = _batchnorm_sample_grads(x, y, mean, invstd)
        gw = w if gw is None else gw + w
        gb = b if gb is None else gb + b
    total = _sq(gw, 1) if _trainable(module, "weight") else torch.zeros(n, dtype=gb.dtype, device=gb.device)
    if _trainable(module, "bias"):
        total = total + _sq(gb, 1)
    return total


#: device types whose batch-norm backward refused the per-sample layout
_NO_FUSED_BN: set[str] = set()


def _batchnorm_sample_grads(x: Tensor, y: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel gradients of BatchNorm's weight and bias: two (B, C) tensors.

    They are the weight and bias gradients of a batch norm over one sample whose channels are the
    batch's (sample, channel) pairs, so for NCHW-contiguous inputs the framework's own batch-norm
    backward computes them in one fused pass over ``x`` and ``b`` (its input gradient not asked
    for): several times faster than separate reductions on CPU.
    """
    n, c = y.shape[0], y.shape[1]
    x, y = _f32(x), _f32(y)
    mean, invstd = mean.to(y.dtype), invstd.to(y.dtype)
    if x.dtype == y.dtype and x.is_contiguous() and y.is_contiguous() and y.device.type not in _NO_FUSED_BN:
        means, invstds = mean.expand(n, -1).reshape(-1), invstd.expand(n, -1).reshape(-1)
        ones = torch.ones_like(means)  # kernels may want a weight and running statistics (unused here)
        try:
            _, w, b = torch.ops.aten.native_batch_norm_backward(
                y.view(1, n * c, -1), x.view(1, n * c, -1), ones, means, ones, means, invstds, True, 0.0,
                [False, True, True])
            return w.view(n, c), b.view(n, c)
        except (RuntimeError, NotImplementedError):  # a backend without it: the separate reductions
            _NO_FUSED_BN.add(y.device.type)
    y3 = y.reshape(n, c, -1)
    b = y3.sum(-1)
    return (torch.linalg.vecdot(y3, x.reshape(n, c, -1)) - mean * b) * invstd, b


def _instancenorm_capture(module: nn.Module, x: Tensor, output: Tensor) -> tuple[Tensor, bool]:
    return x, module.training or not module.track_running_stats


def _instancenorm_sq_norms(module: nn.Module, ctxs: list, gs: list[Tensor], form: str,
        fused: list[bool] | None = None) -> Tensor:
    xhats = []
    for x, input_stats in ctxs:
        if input_stats:
            xhat = F.instance_norm(_f32(x), use_input_stats=True, eps=module.eps)
        else:
            xhat = F.instance_norm(_f32(x), _f32(module.running_mean), _f32(module.running_var),
                                   use_input_stats=False, eps=module.eps)
        xhats.append(xhat)
    return _channel_affine(module, xhats, gs)


def _groupnorm_sq_norms(module: nn.GroupNorm, xs: list[Tensor], gs: list[Tensor], form: str,
        fused: list[bool] | None = None) -> Tensor:
    xhats = [F.group_norm(_f32(x), module.num_groups, eps=module.eps) for x in xs]
    return _channel_affine(module, xhats, gs)


def _layernorm_capture(module: nn.LayerNorm, x: Tensor, output: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The input and the mean and inverse std the forward normalised with, kept by autograd for
    its own backward (no second normalisation at backward time), when they are there."""
    node = output.grad_fn
    if type(node).__name__ == "NativeLayerNormBackward0":
        mean, rstd = getattr(node, "_saved_result1", None), getattr(node, "_saved_result2", None)
        if isinstance(mean, Tensor) and isinstance(rstd, Tensor) and mean.shape == rstd.shape:
            return x, mean, rstd
    return x, None, None


def _layernorm_sq_norms(module: nn.LayerNorm, ctxs: list, gs: list[Tensor], form: str,
        fused: list[bool] | None = None) -> Tensor:
    shape = tuple(module.normalized_shape)
    xhats = []
    for x, mean, rstd in ctxs:
        if mean is None:
            xhats.append(F.layer_norm(_f32(x), shape, eps=module.eps))
        else:
            xhats.append((_f32(x) - mean) * rstd)
    return _feature_affine(module, xhats, gs, math.prod(shape))


def _rmsnorm_sq_norms(module: nn.Module, xs: list[Tensor], gs: list[Tensor], form: str,
        fused: list[bool] | None = None) -> Tensor:
    shape = tuple(module.normalized_shape)
    xhats = [F.rms_norm(_f32(x), shape, eps=module.eps) for x in xs]
    return _feature_affine(module, xhats, gs, math.prod(shape))


def _embedding_sq_norms(module: nn.Embedding, xs: list[Tensor], gs: list[Tensor], form: str,
        fused: list[bool] | None = None) -> Tensor:
    n = gs[0].shape[0]
    d = module.embedding_dim
    idx = _cat([x.reshape(n, -1) for x in xs], 1)  # (B, T)
    g = _f32(_cat([y.reshape(n, -1, d) for y in gs], 1))  # (B, T, D)
    if module.padding_idx is not None:  # the padding row gets no gradient
        g = g * (idx != module.padding_idx).unsqueeze(-1)
    t = idx.shape[1]
    if t == 1:
        return _sq(g[:, 0], 1)
    if form == "ghost" or (form == "auto" and t <= 16):
        same = idx.unsqueeze(2) == idx.unsqueeze(1)  # (B, T, T)
        gram = torch.bmm(g, g.mT)
        return torch.linalg.vecdot(gram.flatten(1), same.flatten(1).to(gram.dtype))
    # Sort the (sample, token) keys, sum the output gradients of equal keys, square, and add the
    # segments up per sample: O(B T D) work, fixed sizes, no host synchronisation.
    vocab = module.num_embeddings
    keys = (idx + vocab * torch.arange(n, device=idx.device).unsqueeze(1)).flatten()
    keys, order = keys.sort()
    starts = torch.ones_like(keys, dtype=torch.bool)
    starts[1:] = keys[1:] != keys[:-1]
    segment = starts.cumsum(0) - 1
    sums = torch.zeros(keys.numel(), d, dtype=g.dtype, device=g.device)
    sums.index_add_(0, segment, g.reshape(-1, d)[order])
    segment_sample = torch.zeros(keys.numel(), dtype=torch.long, device=g.device)
    segment_sample.scatter_(0, segment, keys // vocab)
    out = torch.zeros(n, dtype=g.dtype, device=g.device)
    return out.index_add_(0, segment_sample, _sq(sums, 1))


def _kernels() -> list[Kernel]:
    kernels = [
        Kernel("linear", (nn.Linear,), _linear_sq_norms, plan=_linear_plan),
        Kernel("conv", (nn.Conv1d, nn.Conv2d), _conv_sq_norms, plan=_conv_plan),
        Kernel("batchnorm", (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
               _batchnorm_sq_norms, _batchnorm_capture),
        Kernel("instancenorm", (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
               _instancenorm_sq_norms, _instancenorm_capture),
        Kernel("groupnorm", (nn.GroupNorm,), _groupnorm_sq_norms),
        Kernel("layernorm", (nn.LayerNorm,), _layernorm_sq_norms, _layernorm_capture),
        Kernel("embedding", (nn.Embedding,), _embedding_sq_norms, param_names=("weight",)),
    ]
    if hasattr(nn, "RMSNorm"):
        kernels.append(Kernel("rmsnorm", (nn.RMSNorm,), _rmsnorm_sq_norms, param_names=("weight",)))
    return kernels


_KERNELS = _kernels()


def supported_types() -> list[str]:
    """Names of the module types whose per-sample norms come from hooks."""
    return [t.__name__ for k in _KERNELS for t in k.types]


def kernel_for(module: nn.Module) -> Kernel | None:
    """The kernel for ``module``, or None when hooks cannot give its per-sample norms.

    A module qualifies when it is an instance of a supported type that keeps that type's
    ``forward`` and has no parameters beyond the type's own (so weight-norm reparametrisations,
    custom subclasses and sparse or frequency-scaled embeddings are not silently mistaken for it).
    """
    for kernel in _KERNELS:
        if not isinstance(module, kernel.types):
            continue
        if not any(type(module).forward is t.forward for t in kernel.types if isinstance(module, t)):
            return None  # a subclass with its own forward: not what the kernel assumes
        if any(name not in kernel.param_names for name in module._parameters):
            return None
        if isinstance(module, nn.Embedding) and (module.sparse or module.scale_grad_by_freq):
            return None
        modes = ("zeros", "reflect", "replicate", "circular")
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode not in modes:
            return None
        return kernel
    return None


def check_path(path: str) -> str:
    if path not in PATHS:
        raise ValueError(f"kernel_path must be one of {PATHS}, got {path!r}")
    return path


def check_form(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return form


def outer_forms_used(t: int, i: int, o: int) -> str:
    """Which form "auto" picks for T positions, I inputs and O outputs (for reports and tests)."""
    if t == 1:
        return "rank-one"
    return "ghost" if t * (i + o) <= i * o else "explicit"


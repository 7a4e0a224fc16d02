"""The choices inside dbx's ``exact`` kernels, each timed against its alternative in one run.

Each line times two ways of computing the same thing on CIFAR ResNet-18 shapes at B = 128, in
turn (best of several calls each), and prints the ratio:

- BatchNorm per-sample terms: the framework's fused batch-norm backward on the (1, B*C, HW)
  layout against separate reductions (vecdot and sum);
- squared norms of per-sample gradients: 2-norms of 1024-element blocks against ``vecdot(x, x)``
  (and the relative error of each, and of one unblocked ``vector_norm``, on all-equal entries);
- the Gram form's kernel taps: added as shifted blocks one spatial dimension at a time against
  one strided reduction, and (CPU) the separable additions against one block per 2-d tap;
- the explicit form's chunk size on CPU: 1M against 4M scratch elements, as the extra cost over
  the batch weight gradient it replaces;
- the batch sum of a chunk of per-sample gradients: one in-place ``addmv_`` against a sum and an add;
- a strided convolution's Gram form: the pixel Gram matrices of the stride phases against the
  Gram matrix of all pixels, and the phases split out in one copy against one copy per phase;
- the per-sample gradients of ResNet-18's 1x1 shortcut convolutions: one batched matrix product
  against the weight gradient of one grouped convolution per chunk.

    python benchmarks/estimator_kernels.py                  # CPU, 1 thread
    python benchmarks/estimator_kernels.py --device cuda
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from functools import partial
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dbx.estimators import kernels as K  # noqa: E402


def best_of(fn: Callable[[], object], device: str, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def line(what: str, chosen: float, other: float, names: tuple[str, str]) -> None:
    print(f"  {what:<44} {names[0]} {chosen * 1e3:8.2f} ms   {names[1]} {other * 1e3:8.2f} ms   "
          f"{other / chosen:5.2f}x")


def batchnorm(device: str) -> None:
    x = torch.randn(128, 64, 32, 32, device=device)
    y = torch.randn_like(x)
    mean, invstd = x.mean((0, 2, 3)), x.var((0, 2, 3)).add(1e-5).rsqrt()
    fused = best_of(lambda: K._batchnorm_sample_grads(x, y, mean, invstd), device)
    K._NO_FUSED_BN.add(x.device.type)
    try:
        separate = best_of(lambda: K._batchnorm_sample_grads(x, y, mean, invstd), device)
    finally:
        K._NO_FUSED_BN.discard(x.device.type)
    line("BatchNorm terms, 128x64x32x32", fused, separate, ("fused bn backward", "separate reductions"))


def squared_norms(device: str) -> None:
    p = torch.randn(28, 147456, device=device)
    line("squared norms, 28 x 147456", best_of(lambda: K._sq(p, 1), device),
         best_of(lambda: torch.linalg.vecdot(p, p), device), ("blocked norms", "vecdot"))
    same = torch.full((4, 1 << 18), 0.3, device=device)
    exact = same.double().square().sum(1)

    def error(values: torch.Tensor) -> float:
        return ((values.double() - exact).abs() / exact).max().item()

    print(f"  {'relative error, 4 x 256K entries all 0.3':<44} blocked norms {error(K._sq(same, 1)):.1e}   "
          f"vecdot {error(torch.linalg.vecdot(same, same)):.1e}   "
          f"one vector_norm {error(torch.linalg.vector_norm(same, dim=1).square()):.1e}")


def taps(device: str) -> None:
    for c, hw in ((256, 8), (128, 16)):
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device)
        x = torch.randn(128, c, hw, hw, device=device)
        g = torch.randn(128, c, hw, hw, device=device)
        saved = set(K.TAPS_IN_ONE_REDUCTION)
        try:
            K.TAPS_IN_ONE_REDUCTION.discard(x.device.type)
            blocks = best_of(partial(K._conv_ghost, conv, x, g), device)
            K.TAPS_IN_ONE_REDUCTION.add(x.device.type)
            reduction = best_of(partial(K._conv_ghost, conv, x, g), device)
        finally:
            K.TAPS_IN_ONE_REDUCTION.clear()
            K.TAPS_IN_ONE_REDUCTION.update(saved)
        chosen, other = (reduction, blocks) if x.device.type in saved else (blocks, reduction)
        names = ("one reduction", "separable blocks") if x.device.type in saved else ("separable blocks", "one reduction")
        line(f"Gram form taps, {c}->{c} at {hw} px", chosen, other, names)
        if x.device.type not in saved:
            separable_against_tap_by_tap(c, hw, device)


def separable_against_tap_by_tap(c: int, hw: int, device: str) -> None:
    """The block additions alone, on one chunk's pixel Gram: one spatial dimension at a time
    (``K._add_taps``) against one block per 2-d tap into a zeroed patch Gram."""
    n = max(1, K.CHUNK_ELEMENTS.get(device, 1 << 20) // (c * hw * hw + 4 * hw ** 4))
    pixels = torch.randn(n, c, hw * hw, device=device)
    gram = torch.bmm(pixels.mT, pixels).view(n, hw, hw, hw, hw)
    (phase,) = K._phases((hw, hw), (1, 1), (3, 3), (1, 1), (1, 1), (hw, hw))

    def tap_by_tap() -> torch.Tensor:
        out = gram.new_zeros(gram.shape)
        for (rows, pixel_rows), (cols, pixel_cols) in itertools.product(*phase.taps):
            out[:, rows, cols, rows, cols].add_(gram[:, pixel_rows, pixel_cols, pixel_rows, pixel_cols])
        return out

    torch.testing.assert_close(K._add_taps(gram, phase, (hw, hw), None), tap_by_tap())
    line(f"  the additions alone, {n} samples", best_of(lambda: K._add_taps(gram, phase, (hw, hw), None), device),
         best_of(tap_by_tap, device), ("separable", "tap by tap"))


def chunks(device: str) -> None:
    conv = nn.Conv2d(128, 128, 3, padding=1, bias=False).to(device)
    x = torch.randn(128, 128, 16, 16, device=device)
    g = torch.randn(128, 128, 16, 16, device=device)
    batch = best_of(lambda: torch.nn.grad.conv2d_weight(x, conv.weight.shape, g, padding=1), device)
    saved = K.CHUNK_ELEMENTS.get(x.device.type)
    extra = {}
    try:
        for size in (1 << 20, 1 << 22):
            K.CHUNK_ELEMENTS[x.device.type] = size
            extra[size] = best_of(lambda: K._conv_explicit(conv, [x], [g], [False]), device) - batch
    finally:
        if saved is None:
            K.CHUNK_ELEMENTS.pop(x.device.type, None)
        else:
            K.CHUNK_ELEMENTS[x.device.type] = saved
    line("explicit form over the batch gradient, 128->128", extra[1 << 20], extra[1 << 22], ("1M chunks", "4M chunks"))


def batch_sum(device: str) -> None:
    rows = torch.randn(4, 147456, device=device)
    total = torch.zeros(147456, device=device)

    def sum_and_add() -> torch.Tensor:
        return total + rows.sum(0)

    torch.testing.assert_close(K._add_batch_sum(total.clone(), rows), sum_and_add())
    line("batch sum of per-sample gradients, 4 x 147456", best_of(lambda: K._add_batch_sum(total, rows), device),
         best_of(sum_and_add, device), ("addmv_", "sum + add"))


def stride_phases(device: str) -> None:
    """ResNet-18's layer3.0.conv1 input (128 channels, 16 px, stride 2), one chunk of 21 samples."""
    x = torch.randn(21, 128, 16, 16, device=device)
    phases = K._phases((16, 16), (1, 1), (3, 3), (1, 1), (2, 2), (8, 8))

    def phase_grams() -> list[torch.Tensor]:
        split = K._split_phases(x, (2, 2))
        parts = [split[(slice(None), *(p.start for p in ph.pixels))].reshape(21, 128, -1) for ph in phases]
        return [torch.bmm(part.mT, part) for part in parts]

    def all_pixels_gram() -> torch.Tensor:
        pixels = x.reshape(21, 128, -1)
        return torch.bmm(pixels.mT, pixels)

    line("pixel Grams, 21x128x16x16, stride 2", best_of(phase_grams, device), best_of(all_pixels_gram, device),
         ("per phase", "all pixels"))
    line("  the phases' pixels", best_of(lambda: K._split_phases(x, (2, 2)), device),
         best_of(lambda: [x[(slice(None), slice(None), *ph.pixels)].contiguous() for ph in phases], device),
         ("one copy", "a copy per phase"))


def pointwise(device: str) -> None:
    for c_in, hw in ((64, 32), (128, 16), (256, 8)):
        x = torch.randn(16, c_in, hw, hw, device=device)
        g = torch.randn(16, 2 * c_in, hw // 2, hw // 2, device=device)
        bmm = partial(K._pointwise_sample_grads, x, g, (2, 2), 1)
        grouped = partial(_grouped_pointwise_grads, x, g)
        torch.testing.assert_close(bmm(), grouped(), rtol=1e-4, atol=1e-4)
        line(f"1x1 stride-2 per-sample grads, 16x{c_in}x{hw}x{hw}", best_of(bmm, device), best_of(grouped, device),
             ("bmm", "grouped conv"))


def _grouped_pointwise_grads(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients of a 1x1 stride-2 convolution as one grouped convolution's."""
    n, c_in, hw = x.shape[0], x.shape[1], x.shape[2]
    return torch.nn.grad.conv2d_weight(x.reshape(1, -1, hw, hw), (n * g.shape[1], c_in, 1, 1),
                                       g.reshape(1, -1, *g.shape[2:]), stride=2, groups=n).view(n, -1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU; 0 = torch's default")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# exact's kernel choices, {args.device}, torch {torch.__version__}: dbx's choice first, "
          f"then the alternative, and how many times slower the alternative is")
    batchnorm(args.device)
    squared_norms(args.device)
    taps(args.device)
    if args.device == "cpu":
        chunks(args.device)
    batch_sum(args.device)
    stride_phases(args.device)
    pointwise(args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

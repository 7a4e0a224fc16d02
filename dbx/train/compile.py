"""``compile: true``: the plain training steps call a ``torch.compile``d model.

A batch-size policy changes B between epochs, and every epoch may end with a shorter batch, so
the compiled model must not specialise on the batch dimension: each input's first dimension is
marked dynamic (``maybe_mark_dynamic``), and one compilation serves every batch size. The other
way, one static compilation per distinct batch size ("buckets"), compiles again at every new size,
and torch gives up (falls back to eager) after ``torch._dynamo.config.recompile_limit`` sizes.
``benchmarks/compile.py`` measures both: on one CPU thread the dynamic graph trained as fast as
the buckets or faster once compiled (MLP 0.94-1.05x eager against 0.86-0.99x; small CNN
0.49-0.81x against 0.49-0.76x), so it is dbx's choice. On the CPU, compiling these small
models does not pay; it is meant for GPUs, where it is unmeasured so far.

What stays eager, and why:

- measuring steps: the estimator's hooks do Python work per layer that a compiled graph would
  either break around or leave out, so epochs the estimator watches call the model itself;
- evaluation: it runs once an epoch in eval mode, which would be a second compiled graph.

The compiled module shares the model's parameters, so the optimizer, checkpoints and the
estimator see one model; its first steps pay the compilation (seconds to a minute).
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["compile_for_training", "MODES"]

MODES = ("dynamic", "buckets")


def compile_for_training(model: torch.nn.Module, mode: str = "dynamic") -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as plain training steps call it: ``forward(inputs) -> outputs``.

    ``mode="dynamic"``: one compilation for every batch size (dbx's choice); ``"buckets"``: one
    per distinct batch size, for comparison."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "buckets":
        return torch.compile(model, dynamic=False)
    compiled = torch.compile(model)

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(inputs, 0)  # the batch dimension: B changes between epochs
        return compiled(inputs)

    return forward

"""The model flags every convolutional factory shares: ``channels_last`` and ``compile``."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["apply_model_options"]


def apply_model_options(model: nn.Module, *, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """``channels_last``: store conv weights NHWC (``torch.channels_last``); cuDNN then runs the
    convolutions NHWC (faster with tensor cores, notably under bf16/fp16 autocast), and so do the
    activations, whatever the input's layout. ``compile``: wrap the model in ``torch.compile``
    (the first steps pay the compilation; its ``state_dict`` keys gain an ``_orig_mod.`` prefix).
    """
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    return model

"""Turn the spec's ``device`` into a torch.device, with an error that says what to do."""
from __future__ import annotations

import torch

from dbx.errors import UserError


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when there is one and the CPU otherwise; ``cuda`` must exist."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            f"device {requested!r} was asked for but CUDA is not available on this machine "
            f"(torch {torch.__version__}). Use --device cpu or --device auto, or set device: auto in the spec."
        )
    device = torch.device(requested)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UserError(f"device {requested!r} does not exist: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"

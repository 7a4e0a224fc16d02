"""dbx in other trainers: ``dbx.integrations.lightning`` (PyTorch Lightning) and
``dbx.integrations.transformers`` (Hugging Face ``Trainer``). **Public API** (docs/your-loop.md).

Each module imports its library when it is itself imported, never when dbx is; the libraries are
optional extras: ``pip install dbx[lightning]``, ``pip install dbx[transformers]``.
"""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"dbx.integrations.{extra} needs {module.split('.')[0]!r}, which is not installed: "
                          f"pip install 'dbx[{extra}]'") from exc

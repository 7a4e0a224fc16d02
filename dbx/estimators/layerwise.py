"""``layerwise``: gradient diversity per layer, and combined over the chosen layers.

Same measurement as ``exact`` (every sample of the measuring epoch, norms from the training
step's own backward), reported per parameter-owning module: for module l,

    diversity_l = sum_i ||g_i,l||^2 / ||sum_i g_i,l||^2

keyed by the module's path (logged as ``diversity/<path>``), and the combined value over the chosen
layers. ``layers`` restricts the hooks to some modules (fnmatch patterns on module paths; a pattern
covers the modules below it), e.g. ``["fc"]`` for the classifier only: then only those modules are
hooked, which makes the measuring epoch nearly free, and modules outside them need no support.
"""
from __future__ import annotations

from typing import Literal, Sequence

from dbx.estimators.exact import ExactEstimator

__all__ = ["LayerwiseEstimator"]


class LayerwiseEstimator(ExactEstimator):
    """Per-layer and combined gradient diversity over a measuring epoch (online).

    Parameters: ``layers`` (module-path patterns to measure; default every layer), ``exclude``
    (patterns to leave out), ``fuse_weight_grads``, ``kernel_path`` (as for ``exact``). See ``ExactEstimator`` for
    the supported modules and BatchNorm.
    """

    name = "layerwise"

    def __init__(self, *, layers: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                 fuse_weight_grads: bool = True, kernel_path: Literal["auto", "cpu", "cuda"] = "auto") -> None:
        super().__init__(exclude=exclude, per_layer=True, fuse_weight_grads=fuse_weight_grads, kernel_path=kernel_path)
        if isinstance(layers, str):
            layers = [layers]
        if not layers:
            raise ValueError("layers must name at least one module-path pattern (\"*\" for all)")
        self.layers = tuple(layers)
        self._include = self.layers

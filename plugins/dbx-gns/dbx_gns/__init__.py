"""dbx-gns: a dbx batch-size policy that follows the gradient noise scale (McCandlish et al. 2018).

The policy is registered as ``gns`` in the entry-point group ``dbx.policies``; see
``dbx_gns.policy.GradientNoiseScale``.
"""
from dbx_gns.policy import GradientNoiseScale, noise_scale

__all__ = ["GradientNoiseScale", "noise_scale"]
__version__ = "0.1.0"

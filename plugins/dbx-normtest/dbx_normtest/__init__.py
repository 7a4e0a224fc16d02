"""dbx-normtest: the norm test of Byrd et al. (2012) as a dbx batch-size policy (``normtest``)."""
from dbx_normtest.policy import NormTest, gradient_statistics

__all__ = ["NormTest", "gradient_statistics"]
__version__ = "0.1.0"

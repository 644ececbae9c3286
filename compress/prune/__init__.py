"""Weight pruning: magnitude, Wanda and SparseGPT; unstructured or N:M; stored packed in `SparseLinear`."""
from .pass_ import Prune
from .sparse_linear import SparseLinear

__all__ = ["Prune", "SparseLinear"]

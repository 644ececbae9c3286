"""Weight pruning: magnitude, Wanda and SparseGPT; unstructured or N:M; stored packed in `SparseLinear`.
Also the FFN activation sparsity reachable at a perplexity budget (`activation_sparsity`, CETT-PPL-1%)."""
from .activation_sparsity import activation_sparsity
from .pass_ import Prune
from .runtime import set_sparse_runtime
from .sparse_linear import SparseLinear

__all__ = ["Prune", "SparseLinear", "activation_sparsity", "set_sparse_runtime"]

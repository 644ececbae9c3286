"""Activation sparsity that skips work: per-layer gate thresholds calibrated to a perplexity budget, and an MLP that
reads only the active neurons' weights when decoding (the `activation_sparsity` pass)."""
from .mlp import ActivationSparseMLP
from .pass_ import ActivationSparsity

__all__ = ["ActivationSparseMLP", "ActivationSparsity"]

"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Score of weight W_ij = |W_ij| * ||X_j||_2, the input feature's L2 norm over all calibration tokens; weights are
compared within each output row (unstructured) or within each block of M input columns (N:M). No weight update."""
from __future__ import annotations

import torch

from .masks import nm_mask, unstructured_mask


class InputNormAccumulator:
    """Running sum of squared inputs per input feature, from a Linear's forward hook (bounded memory: one vector)."""

    def __init__(self, in_features: int, device) -> None:
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        for part in x.split(1024):  # float64 a slice at a time (a whole 8 x 2048-token batch 14336 wide: 1.9 GB)
            self.sq_sum += part.double().pow(2).sum(0)
        self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        return self.sq_sum.sqrt().float()

    def finite(self) -> bool:
        return bool(torch.isfinite(self.sq_sum).all())


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float() * input_norms.to(weight.device).float().unsqueeze(0)


def wanda_mask(weight: torch.Tensor, input_norms: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    scores = wanda_scores(weight, input_norms)
    if nm is not None:
        return nm_mask(scores, *nm)
    return unstructured_mask(scores, sparsity, per_row=True)

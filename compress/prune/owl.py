"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): non-uniform per-layer sparsity, same mean.

A layer's outlier ratio D_l is the fraction of its Wanda scores |W_ij| * ||X_j|| above `threshold` times the
layer's mean score. Ratios are min-max scaled into [0, 2*lambda] and shifted so that their mean is the target
density (1 - sparsity); layers with more outliers keep more weights."""
from __future__ import annotations

import torch


def outlier_ratio(scores: list[torch.Tensor], threshold: float = 5.0) -> float:
    """Fraction of a layer's scores (all its pruned matrices together) above threshold x their mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / total
    return sum(int((s > threshold * mean).sum()) for s in scores) / total


def owl_sparsities(outlier_ratios: list[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """Per-layer sparsities with mean `sparsity`, spread over +-lam by outlier ratio (more outliers, less pruning)."""
    d = torch.tensor(outlier_ratios, dtype=torch.float64)
    span = float(d.max() - d.min())
    scaled = (d - d.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(d)
    density = scaled - scaled.mean() + (1 - sparsity)
    return [float(x) for x in _clamp_keeping_mean(1 - density, sparsity, 0.0, MAX_LAYER_SPARSITY)]


MAX_LAYER_SPARSITY = 0.999  # a layer keeps at least 0.1% of its weights


def _clamp_keeping_mean(x: torch.Tensor, mean: float, lo: float, hi: float) -> torch.Tensor:
    """x clamped into [lo, hi] with its mean kept at `mean` (a high target with a wide spread pushes layers past
    the bounds; clamping alone lowered the model's sparsity below the recipe's, silently): what the clamped layers
    lose or gain is shared equally by the layers still inside the bounds, repeatedly, so the order of the layers'
    sparsities is kept."""
    x = x.clone()
    for _ in range(len(x) + 1):
        x = x.clamp(lo, hi)
        excess = mean * len(x) - float(x.sum())
        free = (x < hi) if excess > 0 else (x > lo)
        if abs(excess) < 1e-12 or not free.any():
            break
        x[free] += excess / int(free.sum())
    return x

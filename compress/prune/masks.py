"""Pruning masks from importance scores (True = keep). The math only; no modules, no hooks."""
from __future__ import annotations

import torch


def parse_structure(structure: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "N:M" -> (N, M), meaning N of every M consecutive input weights are ZERO...

    Convention (as in the Wanda/SparseGPT papers and NVIDIA's 2:4): "2:4" keeps 2 of every 4, so N is the number kept."""
    if structure == "unstructured":
        return None
    n, m = structure.split(":")
    return int(n), int(m)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep the largest scores: exactly round(sparsity * count) pruned, over the whole matrix or per output row."""
    if sparsity <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        k = int(round(scores.shape[1] * sparsity))
        idx = torch.argsort(scores, dim=1, stable=True)[:, :k]
        mask = torch.ones_like(scores, dtype=torch.bool)
        mask.scatter_(1, idx, False)
        return mask
    flat = scores.flatten()
    k = int(round(flat.numel() * sparsity))
    idx = torch.argsort(flat, stable=True)[:k]
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[idx] = False
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest scores in every block of m consecutive input columns."""
    rows, cols = scores.shape
    blocks = scores.reshape(rows, cols // m, m)
    keep = torch.topk(blocks, n, dim=-1).indices
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.reshape(rows, cols)

"""Pruning masks from importance scores (True = keep). The math only; no modules, no hooks."""
from __future__ import annotations

import re

import torch

from ..errors import ConfigError


MAX_M = 256


def parse_structure(structure: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "N:M" -> (N, M): N weights KEPT in every block of M consecutive input columns.

    The convention of the Wanda/SparseGPT papers and NVIDIA's 2:4 sparsity: "2:4" keeps 2 of every 4."""
    if structure == "unstructured":
        return None
    if not re.fullmatch(r"\d+:\d+", structure):
        raise ConfigError(f'structure must be "unstructured" or "N:M" like "2:4" (got {structure!r})')
    n, m = (int(p) for p in structure.split(":"))
    if not 0 < n < m:
        raise ConfigError(f"structure {structure!r}: N (kept) must be at least 1 and smaller than M")
    if m > MAX_M:  # a kept weight's position inside its block is stored in a byte (kernels/sparse_nm.py)
        raise ConfigError(f"structure {structure!r}: M is at most {MAX_M} (blocks of M columns; 2:4, 4:8, 8:16 "
                          "are the usual ones); for sparsity without a block structure use unstructured")
    return n, m


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep the largest scores: exactly round(sparsity * count) pruned, over the whole matrix or per output row. At
    ties the lowest indices are pruned first: the result of the reference code's stable ascending sort, found
    with a selection (kthvalue) instead of a sort (4096 x 14336 on 2 CPU cores: 1.9 -> 0.7 s per row, 7.3 -> 1.2 s
    over the matrix)."""
    if sparsity <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = scores if per_row else scores.reshape(1, -1)
    k = int(round(flat.shape[1] * sparsity))
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if flat.is_cuda and flat.shape[0] == 1:  # CUDA selects within one block per row: one SM for a whole matrix
        mask = torch.ones_like(flat, dtype=torch.bool)
        mask[0, torch.argsort(flat[0], stable=True)[:k]] = False
        return mask.view_as(scores)
    kth = flat.kthvalue(k, dim=1, keepdim=True).values
    pruned = flat < kth
    ties = flat == kth  # pruned in index order until each row has k
    room = k - pruned.sum(1, keepdim=True, dtype=torch.int32)
    pruned |= ties & (ties.cumsum(1, dtype=torch.int32) <= room)
    return (~pruned).view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest scores in every block of m consecutive input columns."""
    rows, cols = scores.shape
    blocks = scores.reshape(rows, cols // m, m)
    keep = torch.topk(blocks, n, dim=-1).indices
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether every block of m consecutive columns keeps exactly n (the packed N:M layout requires it)."""
    rows, cols = mask.shape
    return cols % m == 0 and bool((mask.reshape(rows, cols // m, m).sum(-1) == n).all())

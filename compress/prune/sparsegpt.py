"""SparseGPT (Frantar & Alistarh 2023, "Massive Language Models Can Be Accurately Pruned in One-Shot").

Layer-wise: minimize ||W X - W' X||^2 with W' sparse. With H = 2/n sum X X^T (float32), dampened by
`dampening * mean(diag H)`, and U the upper Cholesky factor of H^-1, columns are processed left to right in blocks:
in each block the mask is chosen by w^2 / [U]_jj^2 (the OBS saliency), every pruned weight's error is spread
over the not-yet-processed columns of its row (the OBS update), and the block's accumulated error is applied to
the remaining columns at once (lazy batch update)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..hessian import (HessianAccumulator, inverse_hessian_factor, mark_dead_inputs,  # noqa: F401 (re-exported)
                       thread_independent)


@dataclass
class SparseGPTResult:
    weight: torch.Tensor           # pruned and updated, zeros where mask is False
    mask: torch.Tensor             # True = kept
    dampening: float               # the relative dampening that made H^-1 factorizable (NaN after a fallback)
    retries: int = 0               # how many times dampening was increased
    fallback: str | None = None    # why the OBS update was skipped, if it was
    notes: list[str] = field(default_factory=list)


@thread_independent
@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    max_retries: int = 4,
) -> SparseGPTResult:
    """Prune `weight` [out, in] to `sparsity` (or N:M, N kept of M) with the OBS update; returns the new weight."""
    # row-major whatever the weight's layout (an activation-sparse MLP holds down_proj column-major); the blocks
    # below are flattened with view()
    w = weight.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    rows, cols = w.shape
    h = hessian.detach().float().clone()
    notes = []
    dead_note = mark_dead_inputs(h)
    if dead_note:
        notes.append(dead_note)
    factor, damp, retries = inverse_hessian_factor(h, dampening, max_retries)
    if factor is None:
        # Not factorizable even with large dampening (or not finite): mask by the diagonal saliency
        # w^2 * H_jj (the Wanda score squared), no weight update.
        diag = torch.diagonal(h)
        finite = bool(torch.isfinite(diag).all()) and bool((diag >= 0).all())
        scores = w.pow(2) * (diag.unsqueeze(0) if finite else 1.0)
        from .masks import nm_mask, unstructured_mask

        mask = nm_mask(scores, *nm) if nm else unstructured_mask(scores, sparsity, per_row=True)
        reason = (f"Hessian not positive definite even with dampening {damp:g} x mean diagonal"
                  if finite else "Hessian has non-finite or negative entries")
        return SparseGPTResult(weight=(w * mask).to(weight.dtype), mask=mask, dampening=float("nan"),
                               retries=retries, fallback=reason + "; pruned by w^2*diag(H) without the OBS update",
                               notes=notes)

    if nm is not None:
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])  # N:M groups must not straddle two blocks
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)  # True = pruned while we go
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = factor[i1:i2, i1:i2]
        d1 = torch.diagonal(hinv1)
        pruned1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            saliency = w1.pow(2) / d1.unsqueeze(0).pow(2)
            k = int(round(saliency.numel() * sparsity))
            if k > 0:
                idx = torch.argsort(saliency.flatten(), stable=True)[:k]
                pruned1.view(-1)[idx] = True
        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                saliency = w1[:, i : i + m].pow(2) / d1[i : i + m].unsqueeze(0).pow(2)
                drop = torch.topk(saliency, m - n, dim=1, largest=False).indices
                pruned1.scatter_(1, i + drop, True)
            q = col.clone()
            q[pruned1[:, i]] = 0
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = q1
        mask[:, i1:i2] = pruned1
        if i2 < cols:
            w[:, i2:] -= err1 @ factor[i1:i2, i2:]
    keep = ~mask
    if retries:
        notes.append(f"Hessian not positive definite at dampening {dampening:g}; used {damp:g} x mean diagonal")
    return SparseGPTResult(weight=(w * keep).to(weight.dtype), mask=keep, dampening=damp, retries=retries, notes=notes)

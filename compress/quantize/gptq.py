"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Layer-wise: minimize ||W X - Q X||^2 with Q on a b-bit grid. With H = 2/n sum X X^T dampened and U the upper
Cholesky factor of H^-1 (compress/hessian.py, shared with SparseGPT), columns are quantized left to right; each
column's rounding error, divided by U_jj, is spread over the not-yet-quantized columns of its row (the OBS update),
block by block with a lazy batch update. A group's scale is taken from the (already updated) weights when the scan
reaches the group's first column. With `act_order`, columns are visited by decreasing H_jj and group scales are
fixed beforehand from the original weights in their original contiguous groups ("static groups"), so the stored
layout stays plain groups without a column permutation.

With a pruning `mask` (True = kept), pruned positions are quantized to exactly zero whatever the updates pushed
into them, and their error feeds the later columns like any other rounding error (SparseGPT's joint
sparsify-and-quantize), so the result keeps the mask's pattern (e.g. 2:4)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..hessian import inverse_hessian_factor, mark_dead_inputs, thread_independent
from .int_quant import group_params, quantize_codes, quantize_rtn


@dataclass
class GPTQResult:
    codes: torch.Tensor               # [out, in] integer codes (float tensor), original column order
    scales: torch.Tensor              # [out, groups]
    zeros: torch.Tensor | None        # [out, groups] or None when symmetric
    dampening: float                  # relative dampening used (NaN after a fallback)
    fallback: str | None = None       # why the OBS update was skipped (round-to-nearest used), if it was
    notes: list[str] = field(default_factory=list)


@thread_independent
@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = True,
    *,
    act_order: bool = False,
    mask: torch.Tensor | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    scale_dtype: torch.dtype = torch.float32,
) -> GPTQResult:
    """Quantize `weight` [out, in] to `bits` with groups of `group_size` input columns; see the module docstring."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    h = hessian.detach().float().clone()
    keep = mask.to(w.device).bool() if mask is not None else None
    if keep is not None:
        w = w * keep
    notes = [n for n in [mark_dead_inputs(h)] if n]
    groups = -(-cols // group_size)
    scales = torch.zeros(rows, groups, device=w.device)
    zeros = None if symmetric else torch.zeros(rows, groups, device=w.device)
    unpermuted, unpermuted_keep = w, keep
    if act_order:
        for g in range(groups):  # static groups from the original weights
            s, z = group_params(w[:, g * group_size:(g + 1) * group_size], bits, symmetric, scale_dtype)
            scales[:, g] = s
            if zeros is not None:
                zeros[:, g] = z
        # one factorization, of the permuted Hessian: factorizing the original first and the permuted one after
        # without retries failed in float32 on some near-singular Hessians (a TypeError on None)
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
        keep = keep[:, perm] if keep is not None else None
    else:
        perm = torch.arange(cols, device=w.device)
        blocksize = max(group_size, blocksize // group_size * group_size)  # a group never straddles two blocks
    factor, damp, retries = inverse_hessian_factor(h, dampening)
    if factor is None:
        codes, scales, zeros = quantize_rtn(unpermuted, bits, group_size, symmetric, scale_dtype, unpermuted_keep)
        return GPTQResult(codes, scales, zeros, float("nan"), notes=notes,
                          fallback="Hessian not factorizable even with large dampening; rounded to nearest")
    if retries:
        notes.append(f"Hessian not positive definite at dampening {dampening:g}; used {damp:g} x mean diagonal")
    group_of = perm // group_size  # group of the column at each scan position
    codes = torch.zeros_like(w)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = factor[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(group_of[col])
            if not act_order and col % group_size == 0:
                # scale from the updated weights of this group (all inside the current block); pruned ones count as 0
                block = w1[:, i:i + group_size]
                if keep is not None:
                    block = block * keep[:, col:col + group_size]
                s, z = group_params(block, bits, symmetric, scale_dtype)
                scales[:, g] = s
                if zeros is not None:
                    zeros[:, g] = z
            z = zeros[:, g] if zeros is not None else None
            q = quantize_codes(w1[:, i:i + 1], scales[:, g], z, bits).squeeze(1)
            if keep is not None:  # the code of exactly zero at pruned positions
                q = torch.where(keep[:, col], q, z if z is not None else torch.zeros_like(q))
            codes[:, col] = q
            deq = (q - z if z is not None else q) * scales[:, g]
            err = (w1[:, i] - deq) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        if i2 < cols:
            w[:, i2:] -= err1 @ factor[i1:i2, i2:]
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return GPTQResult(codes, scales, zeros, damp, notes=notes)

"""Unstructured sparse linear layer: y = x @ W^T + b with W stored as a bitmask + the kept values.

Layout:
- bitmask     [out, ceil(in / 8)] uint8: bit (c % 8) of byte c // 8 of a row is 1 where W[row, c] is kept;
- values      [nnz]: the kept weights in row-major order;
- row_offsets [out] int64: index in `values` of each row's first kept weight.

The Triton kernel decodes each [BLOCK_N, BLOCK_K] tile from the bitmask (a running per-row count plus an
exclusive prefix sum of the tile's bits gives every kept weight's index in `values`) and multiplies it with x.
`bitmask_linear` runs it on CUDA tensors, the C kernels of sparse_linear_cpu.py on the CPU, and the torch
reference where neither applies (gradients, no compiler; see dispatch.py)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .dispatch import use_triton


@functools.lru_cache(maxsize=None)
def _byte_to_bools(device: torch.device) -> torch.Tensor:
    """[256] int64 whose 8 bytes are the bools of a byte's bits, in order (built from the bytes, so it holds on
    either endianness)."""
    bools = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
    return bools.to(torch.uint8).contiguous().view(torch.int64).reshape(256).to(device)


def unpack_bitmask(bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out, ceil(in/8)] uint8 -> [out, in] bool: one 8-byte lookup per byte (4096 x 14336 on 2 idle cores: 41-49
    ms; the eight shifted byte planes it replaced 60-74 ms)."""
    bools = _byte_to_bools(bitmask.device)[bitmask.contiguous().long()].view(torch.bool)
    return bools.view(bitmask.shape[0], bitmask.shape[1] * 8)[:, :in_features]


@functools.lru_cache(maxsize=None)
def _byte_popcount(device: torch.device) -> torch.Tensor:
    return torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int64, device=device)


def bitmask_row_counts(bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out] int64: the kept entries of each row, from a popcount table over the bytes (the padding bits past
    `in_features` left out). unpack_bitmask(...).sum(1) built the whole [out, in] bool mask first: 41% of loading a
    50%-unstructured checkpoint (a helper's profile: 0.86 s per 14336 x 4096 layer, against 0.25 s)."""
    last = in_features % 8
    if last:  # (pack_bitmask leaves them zero; a file may not)
        bitmask = bitmask.clone()
        bitmask[:, -1] &= (1 << last) - 1
    return _byte_popcount(bitmask.device)[bitmask.long()].sum(1)


def bitmask_decode_reference(values: torch.Tensor, bitmask: torch.Tensor, in_features: int,
                             dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense [out, in] weight (zeros where pruned)."""
    keep = unpack_bitmask(bitmask, in_features)
    dense = torch.zeros(keep.shape, dtype=dtype or values.dtype, device=values.device)
    dense.masked_scatter_(keep, values.to(dense.dtype))  # fills row-major, the order values are stored in
    return dense


def bitmask_linear_reference(x, values, bitmask, row_offsets, in_features, bias=None):
    return F.linear(x, bitmask_decode_reference(values, bitmask, in_features, x.dtype), bias)


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch reference runs without triton
    triton = None

if triton is not None:

    @triton.jit
    def _bitmask_linear_kernel(
        x_ptr, v_ptr, mask_ptr, off_ptr, b_ptr, y_ptr,
        M, N, K, MASK_ROW_BYTES,
        stride_xm, stride_xk, stride_ym, stride_yn,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        # offsets in 64 bits: rows x stride passes 2^31 in batched long prompts (8 x 32k tokens x 14336 outputs)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        count = tl.load(off_ptr + rn, mask=rn < N, other=0)  # index of the next kept value of each row
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0).to(tl.float32)
            valid = (rn < N)[:, None] & (rk < K)[None, :]
            byte = tl.load(mask_ptr + rn[:, None] * MASK_ROW_BYTES + (rk >> 3)[None, :], mask=valid, other=0)
            bit = (byte.to(tl.int32) >> (rk & 7)[None, :]) & 1
            bit = tl.where(valid, bit, 0)
            before = tl.cumsum(bit, axis=1) - bit                 # kept weights left of each column in this tile
            where = count[:, None] + before
            w = tl.load(v_ptr + where, mask=bit == 1, other=0.0).to(tl.float32)
            count += tl.sum(bit, axis=1)
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")  # fp32 accuracy on GPUs too (no TF32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])


def bitmask_linear_triton(x, values, bitmask, row_offsets, in_features, bias=None, block_m=16, block_n=32, block_k=32):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    rows = bitmask.shape[0]
    y = torch.empty(x2.shape[0], rows, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(x2.shape[0], block_m), triton.cdiv(rows, block_n))
    values, bitmask = values.contiguous(), bitmask.contiguous()
    _bitmask_linear_kernel[grid](
        x2, values, bitmask, row_offsets.contiguous(), bias if bias is not None else values, y,
        x2.shape[0], rows, in_features, bitmask.shape[1],
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y.view(*lead, rows)


def bitmask_linear(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor,
                   in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias) with W in the bitmask layout above."""
    if use_triton(x, values, bitmask):
        return bitmask_linear_triton(x, values, bitmask, row_offsets, in_features, bias)
    from .sparse_linear_cpu import bitmask_linear_cpu, cpu_sparse_applies

    if cpu_sparse_applies(x, in_features, values, bitmask):
        return bitmask_linear_cpu(x, values, bitmask, row_offsets, in_features, bias)
    return bitmask_linear_reference(x, values, bitmask, row_offsets, in_features, bias)

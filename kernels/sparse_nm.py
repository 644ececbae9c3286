"""N:M sparse linear layer: y = x @ W^T + b with W stored as kept values + packed per-group position indices.

Layout (one output row of W per row of each tensor):
- values  [out, in * n / m]: the n kept weights of every group of m input columns, in column order;
- indices [out, ceil(in * n / m * bits / 8)] uint8: each kept weight's position inside its group (0..m-1) as a
  `bits = ceil(log2 m)`-bit field, packed little-endian as one bit stream per row (2:4 -> 2 bits per kept value).

`nm_linear` runs the Triton kernel for CUDA tensors, the C kernels of sparse_linear_cpu.py on the CPU, and the
torch reference where neither applies (gradients, no compiler; see dispatch.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import use_triton


def index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def unpack_bit_fields(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """[rows, bytes] uint8 bit streams -> [rows, count] uint8 fields of `bits` (<= 8) bits each, little-endian.

    Works on whole byte planes (uint8 ops over [rows, bytes]): much faster on CPU than per-bit int64 arithmetic."""
    rows = packed.shape[0]
    stream = torch.stack([(packed >> b) & 1 for b in range(8)], dim=-1).view(rows, -1)[:, : count * bits]
    stream = stream.reshape(rows, count, bits)
    fields = stream[..., 0].clone()
    for b in range(1, bits):
        fields |= stream[..., b] << b
    return fields


def nm_positions(indices: torch.Tensor, kept: int, m: int) -> torch.Tensor:
    """[rows, kept] uint8: each kept value's position inside its group of m."""
    rows = indices.shape[0]
    bits = index_bits(m)
    if 8 % bits == 0:  # fields never straddle bytes: one shift per field slot of a byte
        per_byte = 8 // bits
        pos = torch.stack([(indices >> (bits * k)) & (2**bits - 1) for k in range(per_byte)], dim=-1)
        return pos.view(rows, -1)[:, :kept]
    return unpack_bit_fields(indices, kept, bits)


def nm_keep_mask(indices: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    """[rows, in] bool of the kept positions: each group's n positions compared with 0..m-1 for small n (2:4 at
    4096 x 14336: 103-133 ms against 341 decoding ones through `nm_decode_reference`, whose int64 scatter indices
    dominate); that decode for larger n, where n comparisons cost more (64:128 at 1024 x 4096: 93 against 15 ms)."""
    rows = indices.shape[0]
    if n > 4:
        ones = torch.ones(rows, in_features // m * n, dtype=torch.uint8, device=indices.device)
        return nm_decode_reference(ones, indices, n, m, in_features) != 0
    pos = nm_positions(indices, in_features // m * n, m).view(rows, -1, n)
    slots = torch.arange(m, dtype=pos.dtype, device=pos.device)
    mask = pos[:, :, 0, None] == slots
    for k in range(1, n):
        mask |= pos[:, :, k, None] == slots
    return mask.view(rows, in_features)


def nm_decode_reference(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense [out, in] weight (zeros where pruned)."""
    rows, kept = values.shape
    pos = nm_positions(indices, kept, m)
    # flat destination of every kept value: row * in + group * m + position (int32 while it fits)
    itype = torch.int32 if rows * in_features < 2**31 else torch.int64
    group_start = torch.arange(0, in_features, m, dtype=itype, device=values.device).repeat_interleave(n)
    row_start = torch.arange(0, rows * in_features, in_features, dtype=itype, device=values.device).unsqueeze(1)
    flat = (pos.to(itype) + group_start + row_start).view(-1).long()
    dense = torch.zeros(rows * in_features, dtype=dtype or values.dtype, device=values.device)
    dense.index_copy_(0, flat, values.reshape(-1).to(dense.dtype))
    return dense.view(rows, in_features)


def nm_linear_reference(x, values, indices, n, m, in_features, bias=None):
    return F.linear(x, nm_decode_reference(values, indices, n, m, in_features, x.dtype), bias)


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch reference runs without triton
    triton = None

if triton is not None:

    @triton.jit
    def _nm_linear_kernel(
        x_ptr, v_ptr, idx_ptr, b_ptr, y_ptr,
        M, N, K, KEPT_PER_ROW, IDX_ROW_BYTES,
        stride_xm, stride_xk, stride_ym, stride_yn,
        HAS_BIAS: tl.constexpr, NKEEP: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        # offsets in 64 bits: rows x stride passes 2^31 in batched long prompts (8 x 32k tokens x 14336 outputs)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0).to(tl.float32)
            group = rk // GROUP
            local = rk % GROUP
            valid = (rn < N)[:, None] & (rk < K)[None, :]
            w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            # Decode the dense tile by gathering: column c of group g holds kept value t if its index equals c % m.
            for t in tl.static_range(NKEEP):
                j = group * NKEEP + t
                val = tl.load(v_ptr + rn[:, None] * KEPT_PER_ROW + j[None, :], mask=valid, other=0.0).to(tl.float32)
                bitpos = j * BITS
                byte = bitpos >> 3
                shift = bitpos & 7
                row = idx_ptr + rn[:, None] * IDX_ROW_BYTES
                b0 = tl.load(row + byte[None, :], mask=valid, other=0).to(tl.int32)
                b1 = tl.load(row + byte[None, :] + 1, mask=valid & ((byte + 1) < IDX_ROW_BYTES)[None, :],
                             other=0).to(tl.int32)
                pos = ((b0 | (b1 << 8)) >> shift[None, :]) & ((1 << BITS) - 1)
                w += tl.where(pos == local[None, :], val, 0.0)
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")  # fp32 operands, no TF32: matches the reference
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])


def nm_linear_triton(x, values, indices, n, m, in_features, bias=None, block_m=16, block_n=32, block_k=32):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    rows = values.shape[0]
    y = torch.empty(x2.shape[0], rows, dtype=x.dtype, device=x.device)
    block_k = triton.next_power_of_2(max(block_k, m))  # tl.arange needs a power of two
    grid = (triton.cdiv(x2.shape[0], block_m), triton.cdiv(rows, block_n))
    values, indices = values.contiguous(), indices.contiguous()
    _nm_linear_kernel[grid](
        x2, values, indices, bias if bias is not None else values, y,
        x2.shape[0], rows, in_features, values.shape[1], indices.shape[1],
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, NKEEP=n, GROUP=m, BITS=index_bits(m),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y.view(*lead, rows)


def nm_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias) with W in the packed N:M layout above."""
    if use_triton(x, values, indices):
        return nm_linear_triton(x, values, indices, n, m, in_features, bias)
    from .sparse_linear_cpu import cpu_sparse_applies, nm_linear_cpu  # it imports index_bits from here

    if cpu_sparse_applies(x, in_features, values, indices):
        return nm_linear_cpu(x, values, indices, n, m, in_features, bias)
    return nm_linear_reference(x, values, indices, n, m, in_features, bias)

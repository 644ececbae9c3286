"""x @ W.T for prefill-sized x with W decoded a block of rows at a time into one reused buffer, then torch's GEMM:
the shared path of the CPU layers that store W packed (quantized codes, pruned values). The buffer stays
cache-resident and is allocated once per call (a whole new weight would cost its first-touch page faults, ~100 ms
at 14336 x 4096) and the GEMM's products are the same as one GEMM over the whole weight, up to the summation order
its blocking picks."""
from __future__ import annotations

from typing import Callable

import torch


# Weight decoded at a time for the GEMM: ~BLOCK_BYTES, a cache-resident buffer (a whole new weight pays its
# first-touch page faults, and a block past the last-level cache is read back from DRAM), at least MIN_ROWS rows
# (torch's GEMM slows down on narrow blocks), and larger for many tokens, where the GEMM's own efficiency matters
# more than the buffer's residency. One thread, AVX2 EPYC with 32 MB L3, a 2:4 SparseLinear vs dense: 64 tokens,
# 4096x11008 0.98x at 128-256 rows, 0.74x at 1024; 512 tokens, 0.92x at 128 rows, 1.02-1.04x at 512-1024.
BLOCK_BYTES = 4 << 20
MIN_ROWS = 256


def rows_per_block(rows: int, tokens: int, in_features: int, element_size: int) -> int:
    block_bytes = BLOCK_BYTES * min(8, max(1, tokens // 64))
    return max(1, min(rows, max(MIN_ROWS, block_bytes // max(1, in_features * element_size))))


def blocked_linear(decode_rows: Callable[[int, int, torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int,
                   buffer_dtype: torch.dtype, block_rows: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`decode_rows(r0, r1, buf)` writes W[r0:r1] into `buf` ([r1 - r0, in], `buffer_dtype`) and returns it."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    out = torch.empty(x2.shape[0], rows, dtype=x.dtype)
    if x2.shape[0] == 0:
        return out.view(*x.shape[:-1], rows)
    # a bias that trains (grad mode, the layer's own parameter) is added outside the GEMM, where autograd sees it
    trained_bias = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    gemm_bias = None if trained_bias or bias is None else bias.to(x.dtype)
    block = max(1, min(block_rows, rows))
    buf = torch.empty(block, d, dtype=buffer_dtype)
    for r0 in range(0, rows, block):
        r1 = min(r0 + block, rows)
        w = decode_rows(r0, r1, buf[:r1 - r0])
        w = w if w.dtype == x.dtype else w.to(x.dtype)
        if gemm_bias is None:
            torch.matmul(x2, w.t(), out=out[:, r0:r1])
        else:  # the bias inside the GEMM, as F.linear does (one rounding in bf16, not two)
            torch.addmm(gemm_bias[r0:r1], x2, w.t(), out=out[:, r0:r1])
    if trained_bias:
        out = out + bias.to(x.dtype)
    return out.view(*x.shape[:-1], rows)

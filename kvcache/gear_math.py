"""The GEAR compression of a batch of chunks: quantization with sparse outliers (compress.kernels.kv_quant), then
a low-rank approximation of the remaining error by power iteration. Tensors are [B, H, n_chunks, C, D].

X = dequant(Q) + S + A @ Bf^T, where
- Q, S come from `quantize_pack` on each chunk: in every quantization group the largest and smallest entries are
  set aside before min/max (S stores their exact correction x - dequant(code), so X is restored there to fp16);
- A @ Bf^T is a rank-r approximation of what is left, E = X - dequant(Q) - S, per chunk and (b, h), from
  `power_iters` subspace iterations; A [C, r] has orthonormal columns, Bf = E^T A [D, r]; both stored in fp16."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernel_api import PackedQuant, quantize_pack, unpack_dequantize


@dataclass
class CompressedChunks:
    """n chunks of C tokens in the shared storage format (the tokens of the chunks concatenated)."""

    codes: torch.Tensor                      # uint8 [B, H, n*C, D*bits/8]
    scale: torch.Tensor                      # fp16  keys [B, H, n*C/G, D]; values [B, H, n*C, D/G]
    zero: torch.Tensor                       # fp16  same shape as scale
    outlier_values: torch.Tensor | None      # fp16  [B, H, n, k]
    outlier_positions: torch.Tensor | None   # int16 (int32 if C*D > 32767) [B, H, n, k], flat t*D + d in the chunk
    lowrank_a: torch.Tensor | None           # fp16  [B, H, n*C, r]   token factor
    lowrank_b: torch.Tensor | None           # fp16  [B, H, n, D, r]  channel factor


def as_packed(codes, scale, zero, outlier_values, outlier_positions, *, bits, group_size, axis, chunk_len):
    """View flat storage ([B, H, N, ...]) as the kernels' PackedQuant over [B, H, n_chunks, C, D] blocks."""
    b, h, n_tok, width = codes.shape
    n, d = n_tok // chunk_len, width * 8 // bits
    per_chunk = lambda t: t.reshape(b, h, n, -1, t.shape[-1])  # noqa: E731
    return PackedQuant(per_chunk(codes), per_chunk(scale), per_chunk(zero), bits, group_size, axis,
                       (b, h, n, chunk_len, d), outlier_values, outlier_positions)


def power_iteration(err: torch.Tensor, rank: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of err [..., C, D] by subspace iteration: err ~ A @ Bf^T, A [..., C, r] orthonormal,
    Bf = err^T A [..., D, r]. The start block is a fixed random matrix, so results are deterministic."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(err.shape[-1], rank, generator=gen).to(err.device, err.dtype).expand(*err.shape[:-2], -1, -1)
    a = None
    for _ in range(iters):
        a = torch.linalg.qr(err @ p).Q
        p = err.transpose(-1, -2) @ a
    return a, p


def compress_chunks(x: torch.Tensor, *, bits: int, group_size: int, axis: str, outlier_ratio: float, rank: int,
                    power_iters: int) -> CompressedChunks:
    """Compress x [B, H, n, C, D] chunk by chunk; see the module docstring."""
    b, h, n, c, d = x.shape
    x = x.float()
    p = quantize_pack(x, bits, group_size, axis, outlier_ratio)
    lr_a = lr_b = None
    if rank:
        err = x - unpack_dequantize(p)  # what quantization + outliers left
        a, bf = power_iteration(err, rank, power_iters)
        lr_a, lr_b = a.reshape(b, h, n * c, rank).half(), bf.half()
    flat = lambda t: t.reshape(b, h, -1, t.shape[-1])  # noqa: E731
    return CompressedChunks(flat(p.codes), flat(p.scale), flat(p.zero), p.outlier_values, p.outlier_positions,
                            lr_a, lr_b)

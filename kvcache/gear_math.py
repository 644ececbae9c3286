"""The GEAR compression of whole chunks into the paged format (compress.kernels.kv_pages): quantization with sparse
outliers (compress.kernels.kv_quant), then a low-rank approximation of the remaining error over a span of tokens.
Tensors are [B, H, tokens, D].

X = dequant(Q) + S + A @ basis^T, where
- Q, S come from `quantize_pack` on each chunk: in every quantization group the largest and smallest entries are
  set aside before min/max (S stores their exact correction x - dequant(code) in fp16, at a uint8 offset inside
  the group);
- basis [D, r] is an orthonormal channel basis of the residual E = X - dequant(Q) - S over the span (power
  iteration on E^T, or a given basis: a page's later chunks reuse the basis of its first ones), A = E @ basis
  [tokens, r]; basis stored in fp16, A in fp16 or fp8 e4m3 (`factor_dtype`). One basis per span (a page) instead of one factor pair per chunk: the
  token factor costs 16 r / D bits per element, the basis almost nothing."""
from __future__ import annotations

import torch

from ..kernels.kv_pages import Page
from .kernel_api import KEY_AXIS, PackedQuant, quantize_pack, unpack_dequantize


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


def group_offsets(positions: torch.Tensor, axis: str, group_size: int, head_dim: int) -> torch.Tensor:
    """kv_quant's flat in-chunk positions t*D + d -> uint8 offsets inside their group (token for keys, channel for
    values); the group itself is implied by the slot (outliers are stored group by group)."""
    pos = positions.long()
    inner = (pos // head_dim) if axis == KEY_AXIS else (pos % head_dim)
    return (inner % group_size).to(torch.uint8)


def quantize_chunks(x: torch.Tensor, *, bits: int, group_size: int, axis: str, outlier_ratio: float,
                    chunk_len: int, scale_format: str = "fp16") -> tuple[Page, PackedQuant]:
    """Quantize x [B, H, n*C, D] chunk by chunk: a Page without low-rank, and the PackedQuant it came from."""
    b, h, t, d = x.shape
    n = t // chunk_len
    p = quantize_pack(x.reshape(b, h, n, chunk_len, d), bits, group_size, axis, outlier_ratio, scale_format)
    flat = lambda u: u.reshape(b, h, -1, u.shape[-1])  # noqa: E731
    page = Page(flat(p.codes), flat(p.scale), flat(p.zero))
    if p.outlier_values is not None:
        page.outlier_values = p.outlier_values
        page.outlier_offsets = group_offsets(p.outlier_positions, axis, group_size, d)
    return page, p


def compress_span(x: torch.Tensor, *, bits: int, group_size: int, axis: str, outlier_ratio: float, chunk_len: int,
                  rank: int, power_iters: int, basis: torch.Tensor | None = None,
                  factor_dtype: torch.dtype = torch.float16, scale_format: str = "fp16") -> Page:
    """Compress x [B, H, n*C, D] into one Page; with `basis` (fp16 [B, H, D, r]) the residual is projected onto it,
    else with rank > 0 a basis of the span's own residual is found."""
    x = x.float()
    page, packed = quantize_chunks(x, bits=bits, group_size=group_size, axis=axis, outlier_ratio=outlier_ratio,
                                   chunk_len=chunk_len, scale_format=scale_format)
    if basis is None and not rank:
        return page
    err = x - unpack_dequantize(packed).reshape(x.shape)
    if basis is None:  # channel basis: the top-r left singular subspace of err^T [D, tokens]
        basis = power_iteration(err.transpose(-1, -2), rank, power_iters)[0].half().contiguous()  # QR: column-major
    a = err @ basis.float()
    if factor_dtype != torch.float16:  # fp8 e4m3: saturate instead of overflowing to NaN
        a = a.clamp(-torch.finfo(factor_dtype).max, torch.finfo(factor_dtype).max)
    page.basis, page.a = basis, a.to(factor_dtype)
    return page

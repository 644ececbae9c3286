"""Integer weight quantization with group scales: the math shared by round-to-nearest and GPTQ.

Conventions (those of compressed-tensors, so the export is a relabelling, not a requantization):
- symmetric, b bits: scale = max|w| / ((2^b - 1) / 2), code = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1);
- asymmetric: scale = (max - min) / (2^b - 1) over a range widened to hold 0, zero point z = clamp(round(-min / scale),
  0, 2^b - 1), code = clamp(round(w / scale) + z, 0, 2^b - 1); dequantized w = (code - z) * scale.
Zero is exact in both (code 0, or code z), so pruned weights stay zero through quantization.
Groups are `group_size` consecutive input columns of one output row; the last group of a row may be shorter when
in_features is not a multiple of group_size (scales then have ceil(in / group_size) columns).
Scales are rounded to the checkpoint's storage dtype before the codes are computed, so a saved and reloaded model
computes exactly what the in-memory one did."""
from __future__ import annotations

import torch


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def expand_groups(per_group: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """[out, groups] -> [out, in] (each group's value repeated over its columns)."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


def group_params(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype = torch.float32):
    """(scale, zero point or None) per row of `w` [out, cols]: one group. Scale rounded to `scale_dtype`."""
    w = w.float()
    if symmetric:
        scale = w.abs().amax(1) / ((2**bits - 1) / 2)
    else:
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale codes it as 0
    scale = scale.to(scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(scale_dtype).tiny))  # underflow
    if symmetric:
        return scale, None
    zero = torch.clamp(torch.round(-lo / scale), 0, 2**bits - 1)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer codes (as float) of `w` [out, cols] with per-row `scale`/`zero` [out] or per-element [out, cols]."""
    symmetric = zero is None
    lo, hi = code_range(bits, symmetric)
    if scale.dim() == 1:
        scale = scale.unsqueeze(1)
        zero = zero.unsqueeze(1) if zero is not None else None
    q = torch.round(w.float() / scale)
    if zero is not None:
        q = q + zero
    return q.clamp(lo, hi)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    if scale.dim() == 1:
        scale = scale.unsqueeze(1)
        zero = zero.unsqueeze(1) if zero is not None else None
    return (q.float() - zero.float() if zero is not None else q.float()) * scale


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: torch.dtype = torch.float32, mask: torch.Tensor | None = None):
    """Round-to-nearest: (codes [out, in] float, scales [out, groups], zero points [out, groups] or None).

    `mask` (True = kept) zeroes pruned weights first; they then get the exact code of zero."""
    w = weight.detach().float()
    if mask is not None:
        w = w * mask
    out, cols = w.shape
    scales, zeros, codes = [], [], []
    for g0 in range(0, cols, group_size):
        block = w[:, g0:g0 + group_size]
        scale, zero = group_params(block, bits, symmetric, scale_dtype)
        scales.append(scale)
        zeros.append(zero)
        codes.append(quantize_codes(block, scale, zero, bits))
    return (torch.cat(codes, 1), torch.stack(scales, 1),
            None if symmetric else torch.stack(zeros, 1))


# ---------------------------------------------------------------------------------------------- bit packing
def pack_codes(codes: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Integer codes [rows, count] -> uint8 storage. 4 bits: two per byte, even column in the low nibble (count
    padded to even); 8 bits: one per byte. Symmetric codes are stored offset by 2^(b-1) (offset binary)."""
    u = codes.to(torch.int16) + (2 ** (bits - 1) if symmetric else 0)
    if bits == 8:
        return u.to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, count: int, bits: int, symmetric: bool) -> torch.Tensor:
    """Inverse of `pack_codes`: int16 codes [rows, count] (signed when symmetric)."""
    p = packed.to(torch.int16)
    if bits == 4:
        p = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)[:, :count]
    return p - (2 ** (bits - 1) if symmetric else 0)


def packed_width(count: int, bits: int) -> int:
    return count if bits == 8 else (count + 1) // 2

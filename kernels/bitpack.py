"""Bit packing of integer codes along the last axis (the KV store's layout, see kv_quant): a little-endian bit
stream, code d at bit d*bits; 3 bits packs 8 codes in 3 bytes. `pack_codes` / `unpack_codes` are the reference
pair; `unpack_lanes` is the CPU decode path's unpacking, lane-outer."""
from __future__ import annotations

import functools

import torch


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [..., D] in [0, 2^bits) -> uint8 [..., D*bits/8] (little-endian bit stream along D)."""
    d = codes.shape[-1]
    if bits == 3:  # 8 codes -> a 24-bit word -> 3 bytes
        words = codes.to(torch.int32).reshape(*codes.shape[:-1], d // 8, 8)
        words = (words << (3 * torch.arange(8, device=codes.device, dtype=torch.int32))).sum(-1, dtype=torch.int32)
        shifts = 8 * torch.arange(3, device=codes.device, dtype=torch.int32)
        return ((words.unsqueeze(-1) >> shifts) & 255).to(torch.uint8).reshape(*codes.shape[:-1], d * 3 // 8)
    per_byte = 8 // bits
    lanes = codes.to(torch.int32).reshape(*codes.shape[:-1], d // per_byte, per_byte)
    shifts = bits * torch.arange(per_byte, device=codes.device, dtype=torch.int32)
    return (lanes << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., D*bits/8] -> uint8 codes [..., D]."""
    nbytes = packed.shape[-1]
    if bits == 3:
        triples = packed.to(torch.int32).reshape(*packed.shape[:-1], nbytes // 3, 3)
        words = triples[..., 0] | (triples[..., 1] << 8) | (triples[..., 2] << 16)
        shifts = 3 * torch.arange(8, device=packed.device, dtype=torch.int32)
        return ((words.unsqueeze(-1) >> shifts) & 7).to(torch.uint8).reshape(*packed.shape[:-1], nbytes * 8 // 3)
    per_byte = 8 // bits
    shifts = bits * torch.arange(per_byte, device=packed.device, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*packed.shape[:-1], nbytes * per_byte)


@functools.lru_cache(maxsize=64)
def _lane_shifts(bits: int, stride: int, dtype: torch.dtype, device: torch.device, dims: int) -> torch.Tensor:
    """[S, 1, ...] shifts of `unpack_lanes` (cached: a decode step calls it per page and layer)."""
    return (bits * torch.arange(stride, dtype=dtype, device=device)).view(-1, *[1] * dims)


def unpack_lanes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes of uint8 [..., D*bits/8] as float32 [S, ..., D/S], lane-outer: lane j holds the codes of channels
    j, j + S, j + 2S, ... (S = 8/bits for 2/4/8 bits, 8 for 3 bits). Every op runs over whole contiguous tensors
    (the lane axis is outermost), which is what makes it fast on a CPU: torch's shifts broadcast along an inner
    axis run element by element, several times slower than this, and an interleaved [..., D] layout would need one."""
    if bits == 3:  # 8 codes per 24-bit word (a code may straddle two bytes)
        triples = packed.reshape(-1, 3)
        if packed.device.type == "cpu":  # one small GEMV beats three strided byte reads; fp32 holds 24 bits exactly
            words = triples.float().mm(torch.tensor([[1.0], [256.0], [65536.0]])).to(torch.int32)
        else:  # (GPU matmuls may round through TF32)
            triples = triples.to(torch.int32)
            words = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        words, stride = words.view(*packed.shape[:-1], -1), 8
    else:
        words, stride = packed, 8 // bits
    if stride == 1:
        return words.unsqueeze(0).float()
    lanes = words.unsqueeze(0) >> _lane_shifts(bits, stride, words.dtype, words.device, words.dim())
    lanes &= (1 << bits) - 1
    return lanes.float()

"""Packed storage of pruned weights (the encoders; the decoders live beside the kernels that run them).

- N:M: kept values [out, in*n/m] + each kept value's position in its group, ceil(log2 m) bits, as a bit stream
  per row (2:4: 2 bits per kept value, so 16-bit values cost 18 bits per kept weight, 0.5625x dense);
- unstructured: a bitmask (1 bit per weight) + the kept values in row-major order + per-row offsets.
`nm_nbytes` / `bitmask_nbytes` are what a packed module stores, so the pass can keep whichever of packed and dense is smaller."""
from __future__ import annotations

import torch

from ..kernels.sparse_nm import index_bits


def pack_bit_fields(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, count] ints < 2**bits -> [rows, ceil(count*bits/8)] uint8, little-endian bit stream per row."""
    rows, count = fields.shape
    if bits == 1:  # a bitmask: bytes throughout (the general path below holds 16 bytes per field)
        stream = torch.nn.functional.pad(fields.to(torch.uint8), (0, (-count) % 8)).view(rows, -1, 8)
        return (stream << torch.arange(8, device=fields.device, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    stream = (fields.long().unsqueeze(-1) >> torch.arange(bits, device=fields.device)) & 1  # [rows, count, bits]
    stream = stream.reshape(rows, count * bits)
    pad = (-stream.shape[1]) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.view(rows, -1, 8) << torch.arange(8, device=fields.device)
    return stream.sum(-1).to(torch.uint8)


def pack_nm(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [out, in*n/m] in weight's dtype, indices uint8) of a weight whose mask keeps n of every m."""
    rows, cols = weight.shape
    groups = cols // m
    keep = mask.reshape(rows, groups, m)
    if not bool((keep.sum(-1) == n).all()):
        raise ValueError(f"mask is not {n}:{m}: every group of {m} input columns must keep exactly {n}")
    pos = _first_kept(keep, n)
    values = weight.reshape(rows, groups, m).gather(-1, pos).reshape(rows, groups * n)
    return values.contiguous(), pack_bit_fields(pos.reshape(rows, groups * n), index_bits(m))


def pack_bitmask(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [nnz], bitmask [out, ceil(in/8)] uint8, row_offsets [out] int64)."""
    bitmask = pack_bit_fields(mask, 1)
    values = weight[mask].contiguous()
    counts = mask.sum(1)
    row_offsets = torch.cumsum(counts, 0) - counts
    return values, bitmask, row_offsets.to(torch.int64)


def nm_nbytes(rows: int, cols: int, n: int, m: int, value_bytes: int) -> int:
    kept = cols // m * n
    return rows * (kept * value_bytes + (kept * index_bits(m) + 7) // 8)


def bitmask_nbytes(rows: int, cols: int, nnz: int, value_bytes: int) -> int:
    """Stored bytes (values + bitmask); in memory SparseLinear adds 8 bytes of row offset per row."""
    return nnz * value_bytes + rows * ((cols + 7) // 8)


def dense_pruned_mask(weight: torch.Tensor, nm: tuple[int, int] | None) -> tuple[torch.Tensor, tuple | None]:
    """(kept mask, (n, m) or None) of a pruned layer stored dense: its exact zeros are the pruned weights. Under an
    N:M structure each group of m keeps exactly n (a kept weight that is itself 0 fills a group with fewer nonzeros,
    the lowest positions first); a group with more than n nonzeros means the layer no longer has the structure (a
    later pass changed it): unstructured then."""
    kept = weight != 0
    if nm is None or weight.shape[1] % nm[1]:
        return kept, None
    n, m = nm
    rows, cols = weight.shape
    groups = kept.reshape(rows, cols // m, m)
    if bool((groups.sum(-1) > n).any()):
        return kept, None
    mask = torch.zeros_like(groups).scatter_(-1, _first_kept(groups, n), True)
    return mask.reshape(rows, cols), nm


def _first_kept(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Positions [.., n] in each group (last dim, m) of its kept entries in ascending order, then, where a group keeps
    fewer than n, its lowest other positions."""
    m = keep.shape[-1]
    order = torch.arange(m, device=keep.device).expand_as(keep)
    return torch.sort(torch.where(keep, order, order + m), dim=-1).values[..., :n] % m

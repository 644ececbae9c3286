"""KV-cache quantizer: asymmetric min-max with 2^b - 1 levels, grouped, codes truly packed, optional outliers.

Layout (the shared storage spec of kvcache/ and kernels/), for x [..., T, D] (T tokens, D = head_dim):
- axis="token"   (keys, KIVI per-channel): each group is G consecutive tokens of one channel;
                 scale/zero fp16 [..., T/G, D].
- axis="channel" (values, KIVI per-token): each group is G consecutive channels of one token;
                 scale/zero fp16 [..., T, D/G].
- codes uint8 [..., T, D*bits/8], packed along D as a little-endian bit stream: code d sits at bit d*bits. For 2,
  4 and 8 bits that is "code j of a byte at bit offset j*bits, low bits first"; 3 bits packs 8 codes in 3 bytes
  (a code may straddle two bytes), so 3-bit storage is exactly 3 bits per code.
- quantization: zero = fp16(min), scale = fp16((max - min) / (2^b - 1)) (zero range: codes 0, x_hat = zero),
  q = clamp(floor((x - zero) / scale + 0.5), 0, 2^b - 1), x_hat = q * scale + zero, computed with the stored fp16
  scale/zero so that dequantization reproduces exactly what the quantizer assumed. With scale_format "log8" the
  scale is one byte (kv_scale.py: 2^(u/8 - 17), the step searched per group, the zero centred) and the same
  formula holds with the decoded scale.
- outliers (GEAR, outlier_ratio = s > 0): in every group the `per_side` largest and `per_side` smallest entries are
  set aside before min/max, per_side = max(1, round(s * G / 2)) (so the kept fraction is 2 * per_side / G, which
  can exceed s for small groups: see `outlier_fraction`). Their codes clamp to the kept range, and the stored fp16
  value is the correction x - dequant(code), so the reconstruction is additive as the spec writes it:
  X = dequant(codes) + scatter_add(outliers). Values fp16 [..., k] and flat positions t * D + d within the (T, D)
  block as int16 (int32 only if T * D > 32767), k = n_groups * 2 * per_side, ordered group by group (groups in the
  scale layout's order), within a group the largest first (descending), then the smallest (ascending).

Public: `quantize_pack` (+ `quantize_keys` / `quantize_values`), `unpack_dequantize`, `pack_codes`, `unpack_codes`.
Each runs a Triton kernel when `dispatch.use_triton` says so (CUDA tensors, or COMPRESS_KERNELS=triton) and the
torch reference (`*_reference`) otherwise."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .bitpack import pack_codes, unpack_codes, unpack_lanes  # noqa: F401  (public here too)
from .dispatch import power_of_two as _pow2, use_triton
from .kv_scale import SCALE_FORMATS, group_codes, scale_values, search_log8

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch reference runs without triton
    triton = None

SUPPORTED_BITS = (2, 3, 4, 8)
AXES = ("token", "channel")


# ------------------------------------------------------------------------------------------------ shapes, checks
def outliers_per_side(outlier_ratio: float, group_size: int) -> int:
    """How many largest (and as many smallest) entries each group sets aside; 0 when outlier_ratio is 0."""
    if outlier_ratio <= 0:
        return 0
    return max(1, round(outlier_ratio * group_size / 2))


def outlier_fraction(outlier_ratio: float, group_size: int) -> float:
    """The fraction of entries actually kept as outliers (2 * per_side / G)."""
    return 2 * outliers_per_side(outlier_ratio, group_size) / group_size


def position_dtype(tokens: int, head_dim: int) -> torch.dtype:
    """The smallest index type for flat positions t * D + d in a (tokens, head_dim) block."""
    return torch.int16 if tokens * head_dim <= torch.iinfo(torch.int16).max else torch.int32


def check_quant_args(shape, bits: int, group_size: int, axis: str, outlier_ratio: float = 0.0,
                     scale_format: str = "fp16") -> None:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits={bits} is not supported: use one of {SUPPORTED_BITS}")
    if scale_format not in SCALE_FORMATS:
        raise ConfigError(f"scale_format={scale_format!r} is not a scale format: use one of {SCALE_FORMATS}")
    if axis not in AXES:
        raise ConfigError(f"axis={axis!r} is not a quantization axis: use 'token' (keys) or 'channel' (values)")
    if len(shape) < 2:
        raise ConfigError(f"quantize_pack needs x of shape [..., tokens, head_dim], got {tuple(shape)}")
    tokens, head_dim = shape[-2], shape[-1]
    if (head_dim * bits) % 8:
        raise ConfigError(f"head_dim={head_dim} x bits={bits} is not a whole number of bytes: use a head_dim "
                          f"that is a multiple of 8")
    if group_size < 1:
        raise ConfigError(f"group_size={group_size} must be positive")
    along = tokens if axis == "token" else head_dim
    if along % group_size:
        what = "number of tokens" if axis == "token" else "head_dim"
        raise ConfigError(f"group_size={group_size} does not divide the {what} ({along}): pick a group size that "
                          f"divides it")
    if not 0 <= outlier_ratio < 1:
        raise ConfigError(f"outlier_ratio={outlier_ratio} must be in [0, 1)")
    per_side = outliers_per_side(outlier_ratio, group_size)
    if 2 * per_side >= group_size:
        raise ConfigError(f"outlier_ratio={outlier_ratio} with group_size={group_size} would set aside every entry "
                          f"of a group: use a smaller ratio or a larger group")


@dataclass
class PackedQuant:
    """Quantized [..., T, D] tensor. `outlier_values`/`outlier_positions` are None without outliers."""

    codes: torch.Tensor              # uint8 [..., T, D*bits/8]
    scale: torch.Tensor              # fp16 (or log8 bytes) [..., T/G, D] (token axis) or [..., T, D/G] (channel)
    zero: torch.Tensor               # fp16, as scale
    bits: int
    group_size: int
    axis: str
    shape: tuple                     # the original [..., T, D]
    outlier_values: torch.Tensor | None = None     # fp16 [..., k]: correction x - dequant(code)
    outlier_positions: torch.Tensor | None = None  # int16/int32 [..., k]: t * D + d

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return unpack_dequantize(self, dtype=dtype)

    def nbytes(self) -> dict:
        """Bytes actually held, itemized."""
        parts = {"codes": self.codes, "scales_zeros": (self.scale, self.zero),
                 "outlier_values": self.outlier_values, "outlier_indices": self.outlier_positions}
        out = {}
        for name, tensors in parts.items():
            tensors = tensors if isinstance(tensors, tuple) else (tensors,)
            out[name] = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return out

    def bits_per_element(self) -> float:
        return 8 * sum(self.nbytes().values()) / math.prod(self.shape)


# ---------------------------------------------------------------------------------------------- torch reference
def _grouped(x: torch.Tensor, group_size: int, axis: str) -> torch.Tensor:
    """[R, T, D] -> [R, n_groups, G] with groups in the scale layout's order."""
    r, t, d = x.shape
    if axis == "token":  # group (g, d) = tokens g*G .. g*G+G-1 of channel d
        return x.reshape(r, t // group_size, group_size, d).transpose(2, 3).reshape(r, -1, group_size)
    return x.reshape(r, t * (d // group_size), group_size)


def _ungrouped(xg: torch.Tensor, t: int, d: int, group_size: int, axis: str) -> torch.Tensor:
    r = xg.shape[0]
    if axis == "token":
        return xg.reshape(r, t // group_size, d, group_size).transpose(2, 3).reshape(r, t, d)
    return xg.reshape(r, t, d)


def _select_outliers(xg: torch.Tensor, per_side: int):
    """Indices [R, n_groups, 2*per_side] within each group: largest first (descending), then smallest
    (ascending), each chosen among entries not chosen yet (first index on ties, like Triton's argmax)."""
    excluded = torch.zeros_like(xg, dtype=torch.bool)
    picks = []
    for largest in (True, False):
        fill = float("-inf") if largest else float("inf")
        for _ in range(per_side):
            cand = xg.masked_fill(excluded, fill)
            idx = cand.argmax(-1, keepdim=True) if largest else cand.argmin(-1, keepdim=True)
            excluded.scatter_(-1, idx, True)
            picks.append(idx)
    return torch.cat(picks, -1), excluded


def quantize_pack_reference(x: torch.Tensor, bits: int, group_size: int, axis: str = "token",
                            outlier_ratio: float = 0.0, scale_format: str = "fp16") -> PackedQuant:
    check_quant_args(x.shape, bits, group_size, axis, outlier_ratio, scale_format)
    shape = tuple(x.shape)
    t, d = shape[-2], shape[-1]
    lead = shape[:-2]
    xg = _grouped(x.reshape(-1, t, d).float(), group_size, axis)  # [R, n_groups, G]
    levels = (1 << bits) - 1
    per_side = outliers_per_side(outlier_ratio, group_size)
    if per_side:
        picks, excluded = _select_outliers(xg, per_side)
        lo = xg.masked_fill(excluded, float("inf")).amin(-1)
        hi = xg.masked_fill(excluded, float("-inf")).amax(-1)
    else:
        lo, hi = xg.amin(-1), xg.amax(-1)
    if scale_format == "log8":
        stored_scale, zero16, q = search_log8(xg, lo, hi, levels, None if not per_side else ~excluded)
    else:
        zero16 = lo.half()
        stored_scale = ((hi - lo) / levels).half()
        safe = stored_scale.float()
        q = group_codes(xg, torch.where(safe == 0, torch.ones_like(safe), safe), zero16, levels)
    zero, scale = zero16.float().unsqueeze(-1), scale_values(stored_scale).unsqueeze(-1)
    codes = pack_codes(_ungrouped(q, t, d, group_size, axis).to(torch.uint8), bits).reshape(*lead, t, d * bits // 8)
    scale_shape = (*lead, t // group_size, d) if axis == "token" else (*lead, t, d // group_size)
    out = PackedQuant(codes, stored_scale.reshape(scale_shape), zero16.reshape(scale_shape), bits, group_size, axis,
                      shape)
    if per_side:
        x_sel = xg.gather(-1, picks)
        residual = x_sel - (q.gather(-1, picks) * scale + zero)
        n_groups = xg.shape[1]
        group = torch.arange(n_groups, device=x.device).unsqueeze(-1)
        if axis == "token":  # group g*D + dd, member j -> token g*G + j, channel dd
            tok, ch = (group // d) * group_size + picks, group % d
        else:               # group tt*(D/G) + gi, member j -> token tt, channel gi*G + j
            tok, ch = group // (d // group_size), (group % (d // group_size)) * group_size + picks
        positions = (tok * d + ch).to(position_dtype(t, d))
        out.outlier_values = residual.half().reshape(*lead, -1)
        out.outlier_positions = positions.expand_as(picks).reshape(*lead, -1).contiguous()
    return out


def _scale_expanded(p: PackedQuant, tensor: torch.Tensor) -> torch.Tensor:
    g = p.group_size
    return scale_values(tensor).repeat_interleave(g, dim=-2 if p.axis == "token" else -1)


def add_outliers(x_hat: torch.Tensor, values: torch.Tensor | None, positions: torch.Tensor | None) -> torch.Tensor:
    """x_hat [..., T, D] += the outlier corrections at their flat positions (in place; returns x_hat)."""
    if values is None:
        return x_hat
    t, d = x_hat.shape[-2:]
    flat = x_hat.view(-1, t * d)
    flat.scatter_add_(1, positions.reshape(flat.shape[0], -1).long(),
                      values.reshape(flat.shape[0], -1).to(x_hat.dtype))
    return x_hat


def unpack_dequantize_reference(p: PackedQuant, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = unpack_codes(p.codes, p.bits).float()
    x_hat = codes * _scale_expanded(p, p.scale) + _scale_expanded(p, p.zero)
    return add_outliers(x_hat.contiguous(), p.outlier_values, p.outlier_positions).to(dtype)


# ------------------------------------------------------------------------------------------------ Triton kernels
if triton is not None:

    @triton.jit
    def _pack_store(codes, out_ptr, rows, row_mask, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
        """Pack integer codes [ROWS, D] along D and store them at out_ptr + row * (D*BITS/8)."""
        if BITS == 3:  # 8 codes -> one 24-bit word -> 3 bytes (a 4th lane computed and masked off)
            lanes = tl.reshape(codes, [ROWS, D // 8, 8])
            words = tl.sum(lanes << (tl.arange(0, 8) * 3)[None, None, :], axis=2)
            k = tl.arange(0, 4)
            packed = (words[:, :, None] >> (k * 8)[None, None, :]) & 255
            offs = rows[:, None, None] * (D * 3 // 8) + tl.arange(0, D // 8)[None, :, None] * 3 + k[None, None, :]
            tl.store(out_ptr + offs, packed.to(tl.uint8), mask=row_mask[:, None, None] & (k < 3)[None, None, :])
        else:
            PER: tl.constexpr = 8 // BITS
            lanes = tl.reshape(codes, [ROWS, D // PER, PER])
            packed = tl.sum(lanes << (tl.arange(0, PER) * BITS)[None, None, :], axis=2)
            offs = rows[:, None] * (D // PER) + tl.arange(0, D // PER)[None, :]
            tl.store(out_ptr + offs, packed.to(tl.uint8), mask=row_mask[:, None])

    @triton.jit
    def _quantize_keys_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, oval_ptr, opos_ptr, T,
                              D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, PER_SIDE: tl.constexpr):
        """One program = one group of G tokens x all D channels of one row (each channel its own group)."""
        r = tl.program_id(0).to(tl.int64)  # rows x T x D passes 2^31 elements at batch x heads x long contexts
        g = tl.program_id(1)
        n_groups = T // G
        LEVELS: tl.constexpr = (1 << BITS) - 1
        t = tl.arange(0, G)
        d = tl.arange(0, D)
        rows = r * T + g * G + t
        x = tl.load(x_ptr + rows[:, None] * D + d[None, :]).to(tl.float32)
        excluded = tl.zeros([G, D], dtype=tl.int32)
        for _ in tl.static_range(PER_SIDE):
            idx = tl.argmax(tl.where(excluded != 0, float("-inf"), x), axis=0)
            excluded = tl.where(t[:, None] == idx[None, :], 1, excluded)
        for _ in tl.static_range(PER_SIDE):
            idx = tl.argmin(tl.where(excluded != 0, float("inf"), x), axis=0)
            excluded = tl.where(t[:, None] == idx[None, :], 1, excluded)
        lo = tl.min(tl.where(excluded != 0, float("inf"), x), axis=0)
        hi = tl.max(tl.where(excluded != 0, float("-inf"), x), axis=0)
        zero16 = lo.to(tl.float16)
        # div_rn: IEEE round-to-nearest division like torch's (a GPU's default fp32 division is approximate), so
        # scales and codes match the torch reference bit for bit
        scale16 = tl.math.div_rn(hi - lo, tl.zeros_like(hi) + LEVELS).to(tl.float16)
        stat = (r * n_groups + g) * D + d
        tl.store(zero_ptr + stat, zero16)
        tl.store(scale_ptr + stat, scale16)
        zero = zero16.to(tl.float32)
        scale = scale16.to(tl.float32)
        safe = tl.where(scale == 0, 1.0, scale)
        q = tl.floor(tl.math.div_rn(x - zero[None, :], safe[None, :]) + 0.5)
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS).to(tl.int32)
        _pack_store(q, codes_ptr, rows, rows >= 0, G, D, BITS)
        if PER_SIDE > 0:  # select again (cheap) and store each outlier's correction and position
            chosen = tl.zeros([G, D], dtype=tl.int32)
            for i in tl.static_range(2 * PER_SIDE):
                if i < PER_SIDE:
                    cand = tl.where(chosen != 0, float("-inf"), x)
                    idx = tl.argmax(cand, axis=0)
                    val = tl.max(cand, axis=0)
                else:
                    cand = tl.where(chosen != 0, float("inf"), x)
                    idx = tl.argmin(cand, axis=0)
                    val = tl.min(cand, axis=0)
                chosen = tl.where(t[:, None] == idx[None, :], 1, chosen)
                code = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(val - zero, safe) + 0.5), 0.0), LEVELS)
                slot = stat * (2 * PER_SIDE) + i
                tl.store(oval_ptr + slot, (val - (code * scale + zero)).to(tl.float16))
                tl.store(opos_ptr + slot, ((g * G + idx) * D + d).to(opos_ptr.dtype.element_ty))

    @triton.jit
    def _quantize_values_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, oval_ptr, opos_ptr, T,
                                D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, PER_SIDE: tl.constexpr,
                                BLOCK_T: tl.constexpr):
        """One program = BLOCK_T tokens of one row; each token's D channels form D/G groups of G."""
        r = tl.program_id(0).to(tl.int64)  # rows x T x D passes 2^31 elements at batch x heads x long contexts
        tb = tl.program_id(1)
        NG: tl.constexpr = D // G
        LEVELS: tl.constexpr = (1 << BITS) - 1
        t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < T
        gi = tl.arange(0, NG)
        j = tl.arange(0, G)
        offs = (r * T + t)[:, None, None] * D + gi[None, :, None] * G + j[None, None, :]
        x = tl.load(x_ptr + offs, mask=tmask[:, None, None], other=0.0).to(tl.float32)
        excluded = tl.zeros([BLOCK_T, NG, G], dtype=tl.int32)
        for _ in tl.static_range(PER_SIDE):
            idx = tl.argmax(tl.where(excluded != 0, float("-inf"), x), axis=2)
            excluded = tl.where(j[None, None, :] == idx[:, :, None], 1, excluded)
        for _ in tl.static_range(PER_SIDE):
            idx = tl.argmin(tl.where(excluded != 0, float("inf"), x), axis=2)
            excluded = tl.where(j[None, None, :] == idx[:, :, None], 1, excluded)
        lo = tl.min(tl.where(excluded != 0, float("inf"), x), axis=2)
        hi = tl.max(tl.where(excluded != 0, float("-inf"), x), axis=2)
        zero16 = lo.to(tl.float16)
        scale16 = tl.math.div_rn(hi - lo, tl.zeros_like(hi) + LEVELS).to(tl.float16)
        stat = (r * T + t)[:, None] * NG + gi[None, :]
        tl.store(zero_ptr + stat, zero16, mask=tmask[:, None])
        tl.store(scale_ptr + stat, scale16, mask=tmask[:, None])
        zero = zero16.to(tl.float32)
        scale = scale16.to(tl.float32)
        safe = tl.where(scale == 0, 1.0, scale)
        q = tl.floor(tl.math.div_rn(x - zero[:, :, None], safe[:, :, None]) + 0.5)
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS).to(tl.int32)
        _pack_store(tl.reshape(q, [BLOCK_T, D]), codes_ptr, r * T + t, tmask, BLOCK_T, D, BITS)
        if PER_SIDE > 0:
            chosen = tl.zeros([BLOCK_T, NG, G], dtype=tl.int32)
            for i in tl.static_range(2 * PER_SIDE):
                if i < PER_SIDE:
                    cand = tl.where(chosen != 0, float("-inf"), x)
                    idx = tl.argmax(cand, axis=2)
                    val = tl.max(cand, axis=2)
                else:
                    cand = tl.where(chosen != 0, float("inf"), x)
                    idx = tl.argmin(cand, axis=2)
                    val = tl.min(cand, axis=2)
                chosen = tl.where(j[None, None, :] == idx[:, :, None], 1, chosen)
                code = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(val - zero, safe) + 0.5), 0.0), LEVELS)
                slot = stat * (2 * PER_SIDE) + i
                tl.store(oval_ptr + slot, (val - (code * scale + zero)).to(tl.float16), mask=tmask[:, None])
                pos = t[:, None] * D + gi[None, :] * G + idx
                tl.store(opos_ptr + slot, pos.to(opos_ptr.dtype.element_ty), mask=tmask[:, None])

    @triton.jit
    def load_code_tile(codes_ptr, rows, row_mask, D: tl.constexpr, BITS: tl.constexpr):
        """Integer codes [ROWS, D] (int32) of the packed rows `rows` (row r starts at codes_ptr + r * D*BITS/8).
        Every byte is loaded once (compiled for sm_90, loading each code's byte made 4x / 2x redundant byte loads
        at 2 / 4 bits that could not be vectorized)."""
        WIDTH: tl.constexpr = D * BITS // 8
        R: tl.constexpr = rows.shape[0]
        if BITS == 8:
            out = tl.load(codes_ptr + rows[:, None] * WIDTH + tl.arange(0, D)[None, :], mask=row_mask[:, None],
                          other=0).to(tl.int32)
        elif BITS == 3:  # 8 codes in 3 bytes: each group's bytes read once (a 4th lane masked) into a 24-bit word
            g = tl.arange(0, D // 8)
            k = tl.arange(0, 4)
            b = tl.load(codes_ptr + rows[:, None, None] * WIDTH + g[None, :, None] * 3 + k[None, None, :],
                        mask=row_mask[:, None, None] & (k < 3)[None, None, :], other=0).to(tl.int32)
            word = tl.sum(b << (k * 8)[None, None, :], axis=2)
            lanes = (word[:, :, None] >> (tl.arange(0, 8) * 3)[None, None, :]) & 7
            out = tl.reshape(lanes, (R, D))
        else:  # each byte read once (contiguous: vector loads), its 8 / BITS codes split out in registers
            PER: tl.constexpr = 8 // BITS
            packed = tl.load(codes_ptr + rows[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :],
                             mask=row_mask[:, None], other=0).to(tl.int32)
            lanes = (packed[:, :, None] >> (tl.arange(0, PER) * BITS)[None, None, :]) & ((1 << BITS) - 1)
            out = tl.reshape(lanes, (R, D))
        return out

    @triton.jit
    def _unpack_dequantize_kernel(codes_ptr, scale_ptr, zero_ptr, out_ptr, T,
                                  D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, TOKEN_AXIS: tl.constexpr,
                                  BLOCK_T: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)  # rows x T x D passes 2^31 elements at batch x heads x long contexts
        tb = tl.program_id(1)
        t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < T
        d = tl.arange(0, D)
        rows = r * T + t
        code = load_code_tile(codes_ptr, rows, tmask, D, BITS).to(tl.float32)
        if TOKEN_AXIS:
            stat = (r * (T // G) + t // G)[:, None] * D + d[None, :]
        else:
            stat = rows[:, None] * (D // G) + (d // G)[None, :]
        scale = tl.load(scale_ptr + stat, mask=tmask[:, None], other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + stat, mask=tmask[:, None], other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * D + d[None, :], code * scale + zero, mask=tmask[:, None])


def _triton_shapes_ok(t: int, d: int, group_size: int, axis: str) -> bool:
    # tl.arange/tl.reshape need power-of-two tile sides; other shapes take the torch reference.
    return _pow2(d) and _pow2(group_size) and d >= 8 and (axis == "token" or group_size <= d)


def quantize_pack_triton(x: torch.Tensor, bits: int, group_size: int, axis: str = "token",
                         outlier_ratio: float = 0.0) -> PackedQuant:
    check_quant_args(x.shape, bits, group_size, axis, outlier_ratio)
    shape = tuple(x.shape)
    t, d = shape[-2], shape[-1]
    lead = shape[:-2]
    xr = x.reshape(-1, t, d).contiguous()
    rows = xr.shape[0]
    dev = x.device
    per_side = outliers_per_side(outlier_ratio, group_size)
    codes = torch.empty(rows, t, d * bits // 8, dtype=torch.uint8, device=dev)
    stat_shape = (rows, t // group_size, d) if axis == "token" else (rows, t, d // group_size)
    scale = torch.empty(stat_shape, dtype=torch.float16, device=dev)
    zero = torch.empty(stat_shape, dtype=torch.float16, device=dev)
    n_out = (t * d // group_size) * 2 * per_side
    oval = torch.empty(rows, max(n_out, 1), dtype=torch.float16, device=dev)
    opos = torch.empty(rows, max(n_out, 1), dtype=position_dtype(t, d), device=dev)
    if rows and t:
        if axis == "token":
            # a [G, D] tile per program: 8 warps from 64 x 128 on (4 spilled 48 B per thread there with outliers;
            # 16 would cap registers at 128 per thread: compile_check, sm_90)
            _quantize_keys_kernel[(rows, t // group_size)](xr, codes, scale, zero, oval, opos, t, D=d, G=group_size,
                                                           BITS=bits, PER_SIDE=per_side,
                                                           num_warps=8 if group_size * d >= 8192 else 4)
        else:
            block_t = 16
            _quantize_values_kernel[(rows, triton.cdiv(t, block_t))](
                xr, codes, scale, zero, oval, opos, t, D=d, G=group_size, BITS=bits, PER_SIDE=per_side,
                BLOCK_T=block_t)
    scale_shape = (*lead, *stat_shape[1:])
    out = PackedQuant(codes.reshape(*lead, t, -1), scale.reshape(scale_shape), zero.reshape(scale_shape), bits,
                      group_size, axis, shape)
    if per_side:
        out.outlier_values = oval.reshape(*lead, n_out)
        out.outlier_positions = opos.reshape(*lead, n_out)
    return out


def unpack_dequantize_triton(p: PackedQuant, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    t, d = p.shape[-2:]
    codes = p.codes.reshape(-1, t, p.codes.shape[-1]).contiguous()
    rows = codes.shape[0]
    out = torch.empty(rows, t, d, dtype=torch.float32, device=codes.device)
    block_t = 16
    if rows and t:
        _unpack_dequantize_kernel[(rows, triton.cdiv(t, block_t))](
            codes, p.scale.contiguous(), p.zero.contiguous(), out, t, D=d, G=p.group_size, BITS=p.bits,
            TOKEN_AXIS=p.axis == "token", BLOCK_T=block_t)
    out = add_outliers(out, p.outlier_values, p.outlier_positions)
    return out.reshape(p.shape).to(dtype)


# -------------------------------------------------------------------------------------------------- public API
def quantize_pack(x: torch.Tensor, bits: int, group_size: int, axis: str = "token",
                  outlier_ratio: float = 0.0, scale_format: str = "fp16") -> PackedQuant:
    """Quantize x [..., T, D] in groups of `group_size` along `axis` ("token": keys, "channel": values) to packed
    `bits`-bit codes with fp16 zeros and fp16 (or "log8": one byte, kv_scale.py) scales; with outlier_ratio > 0 set
    aside each group's extremes first. (log8's step search runs in torch on any device: the Triton quantizer
    computes fp16 min-max only.)"""
    check_quant_args(x.shape, bits, group_size, axis, outlier_ratio, scale_format)
    if (scale_format == "fp16" and use_triton(x)
            and _triton_shapes_ok(x.shape[-2], x.shape[-1], group_size, axis)):
        return quantize_pack_triton(x, bits, group_size, axis, outlier_ratio)
    return quantize_pack_reference(x, bits, group_size, axis, outlier_ratio, scale_format)


def quantize_keys(x: torch.Tensor, bits: int, group_size: int, outlier_ratio: float = 0.0,
                  scale_format: str = "fp16") -> PackedQuant:
    """Keys [..., T, D]: per channel, in groups of `group_size` consecutive tokens (KIVI)."""
    return quantize_pack(x, bits, group_size, "token", outlier_ratio, scale_format)


def quantize_values(x: torch.Tensor, bits: int, group_size: int, outlier_ratio: float = 0.0,
                    scale_format: str = "fp16") -> PackedQuant:
    """Values [..., T, D]: per token, in groups of `group_size` consecutive channels (KIVI)."""
    return quantize_pack(x, bits, group_size, "channel", outlier_ratio, scale_format)


def unpack_dequantize(p: PackedQuant, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reconstruction [..., T, D]: dequant(codes) + outlier corrections."""
    t, d = p.shape[-2:]
    if p.scale.dtype == torch.float16 and use_triton(p.codes) and _triton_shapes_ok(t, d, p.group_size, p.axis):
        return unpack_dequantize_triton(p, dtype)
    return unpack_dequantize_reference(p, dtype)

"""QuantizedLinear on the CPU (csrc/qgemv.c; bf16 x on CPUs with AVX512-BF16, csrc/qgemv_bf16.c). Decoding
(<= MAX_TOKENS tokens): the packed int4 / int8 codes multiplied as they are, so a step reads the codes' bytes (an
eighth / a quarter of float32's) instead of building the float weight on every call. Prefill: up to ROW_BLOCK rows at
a time dequantized into one reused buffer (bit for bit the torch reference's weight) and multiplied by torch's GEMM
(the same products as one GEMM over the whole weight, up to the summation order its blocking picks). The torch
reference (`QuantizedLinear.dequantized_weight()` then a matmul) stays the path for gradients, pruned-then-quantized
layers, float16 / float64, CUDA, and machines without a C compiler."""
from __future__ import annotations

import ctypes

import torch

from .cpu_blocked import blocked_linear, rows_per_block
from .cpu_build import load_c_library
from ..environment import setting

# Tokens up to which the C product runs; above, the blocked dequantize + torch GEMM. Timed path against path
# (14336x4096 int4, cache-cold, one thread, an AVX512-BF16 Xeon): in float32 the product leads through 16 tokens
# (37 vs 46 ms at 16). bf16 x on a CPU with AVX512-BF16 takes csrc/qgemv_bf16.c, which leads both the dense bf16
# layer and the blocked path through 16 tokens at Llama-3-8B's MLP shapes (Zen 5: int4 1.3-1.5x dense at 16, int8
# 1.0-1.2x; not re-timed on an AMX Xeon); elsewhere bf16 x goes through qgemv.c's float32 loop, which the blocked
# path (AMX GEMM) leads from 8 tokens on that Xeon (28 vs 29 ms; 26 vs 53 at 16), hence MAX_TOKENS_BF16.
MAX_TOKENS = 16
MAX_TOKENS_BF16 = 6


def max_tokens(dtype: torch.dtype, in_features: int | None = None, group: int | None = None) -> int:
    """Tokens up to which x of this dtype takes the C product (a layer's width and group say whether bf16 x has the
    bf16 dot-product kernel; without them, qgemv.c's limit)."""
    if dtype != torch.bfloat16 or (group is not None and cpu_qgemv_bf16_applies(in_features, group, dtype)):
        return MAX_TOKENS
    return MAX_TOKENS_BF16
SCALE_DTYPES = (torch.float32, torch.bfloat16)
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 stays on the torch path (it computes in it)

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = (("qgemv", (_PTR, _I64, _PTR, _INT, _PTR, _INT, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _INT),
                _INT),
               ("dequantize", (_PTR, _I64, _PTR, _INT, _PTR, _INT, _I64, _I64, _I64, _PTR, _INT, _INT), _INT))


def _library():
    return load_c_library("qgemv", _SIGNATURES)


def _decoding_input(x: torch.Tensor, in_features: int) -> bool:
    """x the C paths take: on the CPU, a row of the layer's width, no gradient needed through it."""
    return (x.device.type == "cpu" and x.dim() > 0 and x.shape[-1] == in_features
            and not (torch.is_grad_enabled() and x.requires_grad))


def cpu_qgemv_applies(packed: torch.Tensor, scale: torch.Tensor, bits: int, in_features: int, group: int,
                      x: torch.Tensor) -> bool:
    """The C product handles this call: few tokens (`max_tokens`), float32/bf16/fp16 x, row-contiguous codes,
    float32/bf16 scales, 4 bits with an even row and group (both nibbles of a byte in one group), a compiler here."""
    if not _decoding_input(x, in_features) or x.dtype not in INPUT_DTYPES:
        return False
    if not 0 < x.numel() <= max_tokens(x.dtype, in_features, group) * in_features:
        return False
    return _stored_as_c_reads(packed, scale) and cpu_qgemv_available(bits, in_features, group, scale.dtype)


def cpu_blocked_applies(packed: torch.Tensor, scale: torch.Tensor, in_features: int, x: torch.Tensor) -> bool:
    """`cpu_blocked_linear` handles this call (the C dequantize, x float32 or bf16): any number of tokens."""
    return _decoding_input(x, in_features) and cpu_dequantize_applies(packed, scale, x.dtype)


def _stored_as_c_reads(packed: torch.Tensor, scale: torch.Tensor) -> bool:
    return (packed.device.type == "cpu" and packed.is_contiguous() and scale.is_contiguous()
            and scale.dtype in SCALE_DTYPES)


def cpu_qgemv_available(bits: int, in_features: int, group: int, scale_dtype: torch.dtype) -> bool:
    """The layer the C product takes (`cpu_dequantize_available`, and 4 bits: an even row and group, so both
    nibbles of a byte share a group); per call, `cpu_qgemv_applies` checks the rest (also what `compress inspect`
    asks, of a model on the meta device)."""
    return not (bits == 4 and (in_features % 2 or group % 2)) and cpu_dequantize_available(scale_dtype)


_BF16_SIGNATURES = (("qgemv_bf16", (_PTR, _I64, _PTR, _INT, _PTR, _INT, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR,
                                     _I64, _INT), _INT),
                    ("qgemv_bf16_available", (), _INT),
                    ("nm24_qgemv_bf16", (_PTR, _I64, _PTR, _I64, _PTR, _INT, _PTR, _INT, _I64, _I64, _I64, _PTR, _I64,
                                         _I64, _PTR, _I64, _INT), _INT),
                    ("nm24_qgemv_bf16_available", (), _INT),
                    ("nm24_dequantize_bf16", (_PTR, _I64, _PTR, _I64, _PTR, _INT, _PTR, _INT, _I64, _I64, _I64, _PTR,
                                              _INT), _INT))


def _bf16_library():
    """csrc/qgemv_bf16.c where this CPU has AVX512-BF16 (else None)."""
    return load_c_library("qgemv_bf16", _BF16_SIGNATURES, requires="qgemv_bf16_available")


def cpu_qgemv_bf16_applies(in_features: int, group: int, x_dtype: torch.dtype) -> bool:
    """bf16 x takes the bf16 dot-product kernel: AVX512-BF16 here, whole groups of a multiple of 32 columns."""
    return (x_dtype == torch.bfloat16 and group % 32 == 0 and in_features % group == 0
            and setting("COMPRESS_KERNELS") != "torch" and _bf16_library() is not None)


def cpu_qgemv(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group: int,
              x: torch.Tensor) -> torch.Tensor:
    """x [..., in] (any float dtype) -> [..., out] float32: sum over groups of scale * sum (code - zero) * x."""
    lead, d = x.shape[:-1], x.shape[-1]
    if cpu_qgemv_bf16_applies(d, group, x.dtype):
        return _qgemv_bf16(packed, scale, zero, bits, group, x.reshape(-1, d).contiguous()).view(*lead, -1)
    x2 = x.reshape(-1, d).float().contiguous()
    t, n = x2.shape[0], packed.shape[0]
    out = torch.empty(t, n, dtype=torch.float32)
    zero = None if zero is None else zero.contiguous()
    ok = _library().qgemv(packed.data_ptr(), packed.stride(0), scale.data_ptr(), int(scale.dtype == torch.bfloat16),
                          None if zero is None else zero.data_ptr(), bits, n, d, group, x2.data_ptr(), x2.stride(0),
                          t, out.data_ptr(), out.stride(0), torch.get_num_threads())
    if not ok:
        raise MemoryError("qgemv: could not allocate its split copy of x")
    return out.view(*lead, n)


def _qgemv_bf16(packed, scale, zero, bits: int, group: int, x2: torch.Tensor) -> torch.Tensor:
    """x2 [t, in] bf16 -> [t, out] float32: the rows of the reference's bf16 weight times x (csrc/qgemv_bf16.c)."""
    t, n = x2.shape[0], packed.shape[0]
    out = torch.empty(t, n, dtype=torch.float32)
    zero = None if zero is None else zero.contiguous()
    _bf16_library().qgemv_bf16(packed.data_ptr(), packed.stride(0), scale.data_ptr(),
                               int(scale.dtype == torch.bfloat16), None if zero is None else zero.data_ptr(), bits,
                               n, x2.shape[1], group, x2.data_ptr(), x2.stride(0), t, out.data_ptr(), out.stride(0),
                               torch.get_num_threads())
    return out


# Tokens up to which a 2:4-pruned quantized layer runs the C product (one thread, AVX2 EPYC, int4 vs the dense float32
# layer: 1.5-2.0x at 8 tokens, 0.8-1.1x at 16, where the blocked dequantize is about as fast)
NM24_MAX_TOKENS = 8
# bf16 x with csrc/qgemv_bf16.c's 2:4 kernel (Zen 5, one core, int4 g128 at Llama-3-8B's MLP shapes, 16 tokens: the
# product 0.9-1.0x the dense bf16 layer, the blocked dequantize + GEMM 0.73-0.77x)
NM24_BF16_MAX_TOKENS = 16
_NM24_SIGNATURES = (("nm24_qgemv", (_PTR, _I64, _PTR, _I64, _PTR, _INT, _PTR, _INT, _I64, _I64, _I64, _PTR, _I64,
                                     _I64, _PTR, _I64, _INT), _INT),
                    ("nm24_dequantize", (_PTR, _I64, _PTR, _I64, _PTR, _INT, _PTR, _INT, _I64, _I64, _I64, _PTR, _INT,
                                         _INT), None))


def nm24_max_tokens(dtype: torch.dtype, in_features: int | None = None, group: int | None = None) -> int:
    """Tokens up to which a 2:4-pruned quantized layer's x takes the C product (bf16 x with the bf16 kernel:
    NM24_BF16_MAX_TOKENS; otherwise NM24_MAX_TOKENS, for bf16 x at most qgemv's bf16 limit)."""
    if dtype == torch.bfloat16 and group is not None and cpu_nm24_qgemv_bf16_applies(in_features, group, dtype):
        return NM24_BF16_MAX_TOKENS
    return min(NM24_MAX_TOKENS, max_tokens(dtype))


def cpu_nm24_qgemv_bf16_applies(in_features: int, group: int, x_dtype: torch.dtype) -> bool:
    """bf16 x takes csrc/qgemv_bf16.c's 2:4 kernel: AVX512-BF16 and VBMI here, whole groups of 64-column steps."""
    return (x_dtype == torch.bfloat16 and group % 64 == 0 and in_features % group == 0
            and setting("COMPRESS_KERNELS") != "torch"
            and load_c_library("qgemv_bf16", _BF16_SIGNATURES, requires="nm24_qgemv_bf16_available") is not None)


def cpu_nm24_qgemv_applies(packed: torch.Tensor, indices: torch.Tensor, scale: torch.Tensor, n: int, m: int,
                           in_features: int, x: torch.Tensor, group: int | None = None) -> bool:
    """The C product of a layer pruned 2:4 then quantized (csrc/qsparse.c; bf16 x on AVX512-BF16 + VBMI CPUs with
    whole 64-column groups, csrc/qgemv_bf16.c) handles this call: few tokens, the checks of `cpu_qgemv_applies` on x
    (its width the layer's: the kernel steps through the codes by it) and the scales, contiguous positions, a
    compiler here."""
    if (n, m) != (2, 4) or not _decoding_input(x, in_features) or x.dtype not in INPUT_DTYPES:
        return False
    most = nm24_max_tokens(x.dtype, in_features, group)
    if not 0 < x.numel() <= most * x.shape[-1] or not indices.is_contiguous():
        return False
    return _stored_as_c_reads(packed, scale) and cpu_nm24_qgemv_available(scale.dtype)


def cpu_nm24_blocked_applies(packed: torch.Tensor, indices: torch.Tensor, scale: torch.Tensor, n: int, m: int,
                             in_features: int, x: torch.Tensor) -> bool:
    """`cpu_nm24_blocked_linear` handles this call (x float32 or bf16, the layer's width): any number of tokens."""
    return ((n, m) == (2, 4) and _decoding_input(x, in_features)
            and x.dtype in (torch.float32, torch.bfloat16) and indices.is_contiguous()
            and _stored_as_c_reads(packed, scale) and cpu_nm24_qgemv_available(scale.dtype))


def cpu_nm24_qgemv_available(scale_dtype: torch.dtype) -> bool:
    return (setting("COMPRESS_KERNELS") != "torch" and scale_dtype in SCALE_DTYPES
            and load_c_library("qsparse", _NM24_SIGNATURES) is not None)


def cpu_nm24_qgemv(packed: torch.Tensor, indices: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   bits: int, group: int, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] (any float dtype) -> [..., out] float32 over the kept codes of a 2:4-pruned quantized layer."""
    lead, d = x.shape[:-1], x.shape[-1]
    zero = None if zero is None else zero.contiguous()  # held here: a temporary copy would be freed before the call
    if cpu_nm24_qgemv_bf16_applies(d, group, x.dtype):
        x2 = x.reshape(-1, d).contiguous()
        out = torch.empty(x2.shape[0], packed.shape[0], dtype=torch.float32)
        _bf16_library().nm24_qgemv_bf16(
            packed.data_ptr(), packed.stride(0), indices.data_ptr(), indices.stride(0), scale.data_ptr(),
            int(scale.dtype == torch.bfloat16), None if zero is None else zero.data_ptr(), bits,
            packed.shape[0], d, group, x2.data_ptr(), x2.stride(0), x2.shape[0], out.data_ptr(), out.stride(0),
            torch.get_num_threads())
        return out.view(*lead, -1)
    x2 = x.reshape(-1, d).float().contiguous()
    t, rows = x2.shape[0], packed.shape[0]
    out = torch.empty(t, rows, dtype=torch.float32)
    ok = load_c_library("qsparse", _NM24_SIGNATURES).nm24_qgemv(
        packed.data_ptr(), packed.stride(0), indices.data_ptr(), indices.stride(0), scale.data_ptr(),
        int(scale.dtype == torch.bfloat16), None if zero is None else zero.data_ptr(), bits, rows, d, group,
        x2.data_ptr(), x2.stride(0), t, out.data_ptr(), out.stride(0), torch.get_num_threads())
    if not ok:
        raise MemoryError("nm24_qgemv: could not allocate its reordered copy of x")
    return out.view(*lead, rows)


def cpu_dequantize_applies(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.bfloat16) and _stored_as_c_reads(packed, scale) \
        and cpu_dequantize_available(scale.dtype)


def cpu_dequantize_available(scale_dtype: torch.dtype) -> bool:
    """The C dequantize for a layer with these scales, not forced to torch, a compiler here (`compress inspect`)."""
    return (setting("COMPRESS_KERNELS") != "torch" and scale_dtype in SCALE_DTYPES
            and _library() is not None)


def cpu_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group: int,
                   in_features: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The float weight [out, in] (float32 or bfloat16) the codes stand for, bit for bit the torch reference's, in
    one pass (csrc/qgemv.c dequantize); None where the C kernel does not apply (the caller runs the reference)."""
    if not cpu_dequantize_applies(packed, scale, dtype):
        return None
    out = torch.empty(packed.shape[0], in_features, dtype=dtype)
    return _dequantize_into(packed, scale, zero, bits, group, out)


def _dequantize_into(packed, scale, zero, bits: int, group: int, out: torch.Tensor) -> torch.Tensor:
    """`cpu_dequantize` into `out` [rows, in] (contiguous), the checks already made."""
    zero = None if zero is None else zero.contiguous()
    ok = _library().dequantize(packed.data_ptr(), packed.stride(0), scale.data_ptr(),
                               int(scale.dtype == torch.bfloat16), None if zero is None else zero.data_ptr(), bits,
                               out.shape[0], out.shape[1], group, out.data_ptr(), int(out.dtype == torch.bfloat16),
                               torch.get_num_threads())
    if not ok:
        raise MemoryError("dequantize: could not allocate its per-thread row")
    return out


# rows dequantized at a time by `cpu_blocked_linear`, at most (14336x4096 int4, 16 / 64 tokens, one thread: float32
# best at 256-512 rows, bf16 at 512-2048, both ~10-20% slower at 128 or below, where the GEMM calls get small); wide
# rows take fewer (cpu_blocked.rows_per_block: ~4 MB a block, at least 256 rows): bf16 4096x14336 at 32-64 tokens,
# one Zen 5 core, 0.80-0.92x dense at 512 rows, 0.98-1.07x at 256
ROW_BLOCK = 512


def cpu_blocked_linear(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group: int,
                       x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T for prefill-sized x without the whole float weight: up to ROW_BLOCK rows at a time dequantized into
    one reused buffer, in x's dtype, and multiplied by torch's GEMM (cpu_blocked.py). Check `cpu_blocked_applies`
    first."""
    def decode_rows(r0, r1, buf):
        return _dequantize_into(packed[r0:r1], scale[r0:r1], None if zero is None else zero[r0:r1], bits, group, buf)
    rows, d = packed.shape[0], x.shape[-1]
    block = min(ROW_BLOCK, rows_per_block(rows, x.numel() // max(1, d), d, x.element_size()))
    return blocked_linear(decode_rows, x, rows, x.dtype, block, bias)


def cpu_nm24_blocked_linear(packed: torch.Tensor, indices: torch.Tensor, scale: torch.Tensor,
                            zero: torch.Tensor | None, bits: int, group: int, x: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same for a 2:4-pruned quantized layer (csrc/qsparse.c nm24_dequantize; check
    `cpu_nm24_blocked_applies` first)."""
    lib, d = load_c_library("qsparse", _NM24_SIGNATURES), x.shape[-1]
    bf16 = cpu_nm24_qgemv_bf16_applies(d, group, x.dtype)
    zero = None if zero is None else zero.contiguous()

    def decode_rows(r0, r1, buf):
        if bf16 and _bf16_library().nm24_dequantize_bf16(
                packed[r0].data_ptr(), packed.stride(0), indices[r0].data_ptr(), indices.stride(0),
                scale[r0].data_ptr(), int(scale.dtype == torch.bfloat16), None if zero is None else zero[r0].data_ptr(),
                bits, r1 - r0, d, group, buf.data_ptr(), torch.get_num_threads()):
            return buf  # (0: positions packing never writes; the float32 loop below decodes the block again)
        lib.nm24_dequantize(packed[r0].data_ptr(), packed.stride(0), indices[r0].data_ptr(), indices.stride(0),
                            scale[r0].data_ptr(), int(scale.dtype == torch.bfloat16),
                            None if zero is None else zero[r0].data_ptr(), bits, r1 - r0, d, group, buf.data_ptr(),
                            int(buf.dtype == torch.bfloat16), torch.get_num_threads())
        return buf
    tokens = x.numel() // max(1, d)
    return blocked_linear(decode_rows, x, packed.shape[0], x.dtype,
                          rows_per_block(packed.shape[0], tokens, d, x.element_size()), bias)

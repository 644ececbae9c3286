"""SparseLinear's `packed` runtime on the CPU (csrc/sparse_linear.c; bf16 values and x on CPUs with AVX512-BF16 and
VBMI/VBMI2, csrc/sparse_bf16.c, up to BF16_MAX_TOKENS). Decoding (<= MAX_TOKENS tokens): the kept
values multiplied where their positions say, straight from the packed storage, so a step reads the packed bytes
(2:4 or 50% in float32: ~0.53x of the dense weight's) instead of decoding the whole weight on every call. Prefill
(and float16 values at any size): blocks of rows decoded into one reused buffer (exactly the torch reference's
weight) and multiplied by torch's GEMM (cpu_blocked.py). The torch reference (decode, then `F.linear`) stays the
path for gradients, float64, CUDA, and machines without a C compiler."""
from __future__ import annotations

import ctypes

import torch

from .cpu_blocked import blocked_linear, rows_per_block
from .cpu_build import load_c_library
from .sparse_nm import index_bits
from ..environment import setting

# Tokens up to which the C product runs; above, the blocked decode + torch GEMM (one thread, AVX2 EPYC, 2:4 against
# the dense layer: the product 1.1-2.0x at 8 tokens, 0.6-1.2x at 16, where the blocked path is 1.0-1.4x).
MAX_TOKENS = 8
VALUE_DTYPES = (torch.float32, torch.bfloat16)  # the C product's; the blocked decode copies any 2- or 4-byte dtype
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = (
    ("nm_linear", (_PTR, _INT, _PTR, _I64, _INT, _INT, _INT, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _INT), _INT),
    ("bitmask_linear", (_PTR, _INT, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _INT), None),
    ("nm_decode", (_PTR, _INT, _PTR, _I64, _INT, _INT, _INT, _I64, _I64, _PTR, _INT), None),
    ("bitmask_decode", (_PTR, _INT, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR, _INT), None),
)


def _library():
    return load_c_library("sparse_linear", _SIGNATURES)


_BF16_SIGNATURES = (
    ("nm24_linear_bf16", (_PTR, _I64, _PTR, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _INT), _INT),
    ("bitmask_linear_bf16", (_PTR, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _INT), _INT),
    ("sparse_bf16_available", (), _INT),
)
# bf16 x and values with csrc/sparse_bf16.c: its product leads the blocked path through 16 tokens (Zen 5, one core,
# Llama-3-8B shapes at 16 tokens, sparse_speed.py: 0.80-1.12x dense, against the blocked path's 0.53-0.79x)
BF16_MAX_TOKENS = 16


def _bf16_library():
    """csrc/sparse_bf16.c where this CPU has AVX512-BF16 and VBMI/VBMI2 (else None)."""
    return load_c_library("sparse_bf16", _BF16_SIGNATURES, requires="sparse_bf16_available")


def cpu_sparse_bf16_available(fmt: str, n: int, m: int, in_features: int) -> bool:
    """bf16 values and x take csrc/sparse_bf16.c's 32-lane dot products: 2:4 with whole 64-column steps, or the
    bitmask with whole 32-column steps, on a CPU that has the instructions (`compress inspect` asks this too)."""
    step = 64 if fmt == "nm" and (n, m) == (2, 4) else 32 if fmt == "bitmask" else 0
    return (step > 0 and in_features % step == 0 and setting("COMPRESS_KERNELS") != "torch"
            and _bf16_library() is not None)


def cpu_sparse_available(values_dtype: torch.dtype) -> bool:
    """The C paths for a layer with values of this dtype (float32 / bf16: both; float16: the blocked decode), not
    forced to torch, a compiler here (`compress inspect` asks this of a model on the meta device)."""
    return (setting("COMPRESS_KERNELS") != "torch" and values_dtype in (*VALUE_DTYPES, torch.float16)
            and _library() is not None)


def cpu_sparse_applies(x: torch.Tensor, in_features: int, values: torch.Tensor, *packed: torch.Tensor) -> bool:
    """A call the C paths take: CPU tensors, x of the layer's width (the kernels step through it by in_features; a
    wrong width goes to the reference, which raises F.linear's shape error), no gradient through x (a bias's
    gradient still flows: it is added by torch), contiguous packed tensors of a dtype they read."""
    if x.device.type != "cpu" or values.device.type != "cpu" or x.dim() == 0 or x.dtype not in INPUT_DTYPES:
        return False
    if x.shape[-1] != in_features:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad):
        return False
    return all(t.is_contiguous() for t in (values, *packed)) and cpu_sparse_available(values.dtype)


def _runs_product(x: torch.Tensor, values: torch.Tensor, most: int = MAX_TOKENS) -> bool:
    """Few tokens and values the C product reads (float16 ones take the blocked decode at any size)."""
    return _tokens(x) <= most and values.dtype in VALUE_DTYPES


def _bf16_dot(x: torch.Tensor, values: torch.Tensor) -> bool:
    return x.dtype == values.dtype == torch.bfloat16


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def _product(run, x: torch.Tensor, rows: int, bias: torch.Tensor | None, widen: bool = True) -> torch.Tensor:
    """x [..., in] through `run(x2, out)` (x2 [t, in] float32, or x's bf16 where not `widen` -> [t, rows] float32),
    + bias, in x's dtype."""
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = (x.reshape(-1, d).float() if widen else x.reshape(-1, d)).contiguous()
    out = torch.empty(x2.shape[0], rows, dtype=torch.float32)
    run(x2, out)
    if bias is not None:  # autograd sees this add where the bias trains
        out = out + bias.float()
    return out.to(x.dtype).view(*lead, rows)


def nm_linear_cpu(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias), W in the packed N:M layout; check `cpu_sparse_applies` first."""
    lib, rows, bits = _library(), values.shape[0], index_bits(m)
    if _bf16_dot(x, values) and _runs_product(x, values, BF16_MAX_TOKENS) and \
            cpu_sparse_bf16_available("nm", n, m, in_features):
        def run_bf16(x2, out):
            _bf16_library().nm24_linear_bf16(values.data_ptr(), values.stride(0), indices.data_ptr(),
                                             indices.stride(0), rows, in_features, x2.data_ptr(), x2.stride(0),
                                             x2.shape[0], out.data_ptr(), out.stride(0), torch.get_num_threads())
        return _product(run_bf16, x, rows, bias, widen=False)
    if _runs_product(x, values):
        def run(x2, out):
            if not lib.nm_linear(values.data_ptr(), int(values.dtype == torch.bfloat16), indices.data_ptr(),
                                 indices.shape[1], n, m, bits, rows, in_features, x2.data_ptr(), x2.stride(0),
                                 x2.shape[0], out.data_ptr(), out.stride(0), torch.get_num_threads()):
                raise MemoryError("nm_linear: could not allocate its reordered copy of x")
        return _product(run, x, rows, bias)

    def decode_rows(r0, r1, buf):
        lib.nm_decode(values[r0].data_ptr(), values.element_size(), indices[r0].data_ptr(), indices.shape[1], n, m,
                      bits, r1 - r0, in_features, buf.data_ptr(), torch.get_num_threads())
        return buf
    return blocked_linear(decode_rows, x, rows, values.dtype,
                          rows_per_block(rows, _tokens(x), in_features, values.element_size()), bias)


def bitmask_linear_cpu(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor,
                       in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias), W in the bitmask layout; check `cpu_sparse_applies` first."""
    lib, rows = _library(), bitmask.shape[0]
    offsets = row_offsets.to(torch.int64).contiguous()
    if _bf16_dot(x, values) and _runs_product(x, values, BF16_MAX_TOKENS) and \
            cpu_sparse_bf16_available("bitmask", 0, 0, in_features):
        def run_bf16(x2, out):
            _bf16_library().bitmask_linear_bf16(values.data_ptr(), bitmask.data_ptr(), bitmask.stride(0),
                                                offsets.data_ptr(), rows, in_features, x2.data_ptr(), x2.stride(0),
                                                x2.shape[0], out.data_ptr(), out.stride(0), torch.get_num_threads())
        return _product(run_bf16, x, rows, bias, widen=False)
    if _runs_product(x, values):
        def run(x2, out):
            lib.bitmask_linear(values.data_ptr(), int(values.dtype == torch.bfloat16), values.numel(),
                               bitmask.data_ptr(), bitmask.shape[1], offsets.data_ptr(), rows, in_features,
                               x2.data_ptr(), x2.stride(0), x2.shape[0], out.data_ptr(), out.stride(0),
                               torch.get_num_threads())
        return _product(run, x, rows, bias)

    def decode_rows(r0, r1, buf):
        lib.bitmask_decode(values.data_ptr(), values.element_size(), values.numel(), bitmask[r0].data_ptr(),
                           bitmask.shape[1], offsets[r0].data_ptr(), r1 - r0, in_features, buf.data_ptr(),
                           torch.get_num_threads())
        return buf
    return blocked_linear(decode_rows, x, rows, values.dtype,
                          rows_per_block(rows, _tokens(x), in_features, values.element_size()), bias)

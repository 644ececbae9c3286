"""QuantizedLinear's product on the CPU when decoding (a few tokens): the packed int4 / int8 codes multiplied as they
are (csrc/qgemv.c), so a decoding step reads the codes' bytes (an eighth / a quarter of float32's) instead of
building the float weight on every call. The torch reference is `QuantizedLinear.dequantized_weight()` then a
matmul: it stays the path for prefill-sized inputs (where the product dominates), gradients, pruned-then-quantized
layers, CUDA, and machines without a C compiler."""
from __future__ import annotations

import ctypes
import os

import torch

from .cpu_build import load_c_library

MAX_TOKENS = 16  # above this the dequantize-then-GEMM path amortizes its temporary weight

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = (("qgemv", (_PTR, _I64, _PTR, _INT, _PTR, _INT, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _INT),
                _INT),)


def _library():
    return load_c_library("qgemv", _SIGNATURES)


def cpu_qgemv_applies(packed: torch.Tensor, scale: torch.Tensor, bits: int, in_features: int, group: int,
                      x: torch.Tensor) -> bool:
    """The C product handles this call: a CPU, few tokens, gradients not needed through x, row-contiguous codes,
    float32/bf16 scales, 4 bits with an even row and group (both nibbles of a byte in one group), a compiler here."""
    if os.environ.get("COMPRESS_KERNELS", "").lower() == "torch" or x.device.type != "cpu":
        return False
    if x.numel() > MAX_TOKENS * in_features or (torch.is_grad_enabled() and x.requires_grad):
        return False
    if packed.stride(-1) != 1 or scale.dtype not in (torch.float32, torch.bfloat16) or not scale.is_contiguous():
        return False
    return cpu_qgemv_available(bits, in_features, group)


def cpu_qgemv_available(bits: int, in_features: int, group: int) -> bool:
    """The shape the C product takes (4 bits: an even row and group, so both nibbles of a byte share a group) and a
    compiler here; per call, `cpu_qgemv_applies` checks the rest."""
    if bits == 4 and (in_features % 2 or group % 2):
        return False
    return _library() is not None


def cpu_qgemv(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group: int,
              x: torch.Tensor) -> torch.Tensor:
    """x [..., in] (any float dtype) -> [..., out] float32: sum over groups of scale * sum (code - zero) * x."""
    lead, d = x.shape[:-1], x.shape[-1]
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

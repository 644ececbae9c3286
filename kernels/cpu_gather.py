"""CPU kernels for the activation-sparse MLP: gather fused into the product, so each active neuron's weight row is
read once from memory. torch has no fused gather-GEMV (index_select copies the rows first, which costs about as
much as the dense product on a memory-bound CPU), so this is a few lines of C (csrc/gather.c, built on first use by
cpu_build.py). Without a compiler, `cpu_library()` is None and the torch reference in activation_sparse.py runs
instead (same results, slower)."""
from __future__ import annotations

import ctypes

import torch

from .cpu_build import load_c_library


_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_GATHER_ARGS = (_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _PTR, _I64, ctypes.c_int)
_QMATVEC_ARGS = (_PTR, _PTR, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, ctypes.c_int)
_SELECT_ARGS = (_PTR, _I64, _I64, _I64, _PTR, _PTR, ctypes.c_float, _PTR, _I64, _PTR, _PTR, _PTR)
_SIGNATURES = (("gather_dot", _GATHER_ARGS, None), ("gather_axpy", _GATHER_ARGS, None),
               ("gather_dot_bf16", _GATHER_ARGS, None), ("gather_axpy_bf16", _GATHER_ARGS, None),
               ("select_silu", _SELECT_ARGS, _I64))
_QMATVEC_SIGNATURES = (("qmatvec_int8", _QMATVEC_ARGS, None), ("qmatvec_int4", _QMATVEC_ARGS, None))


def cpu_library():
    """The compiled kernels of csrc/gather.c (ctypes CDLL), or None where no C compiler is available."""
    return load_c_library("gather", _SIGNATURES)


WEIGHT_DTYPES = (torch.float32, torch.bfloat16)  # what the gathers read; x, h and the results are float32


def cpu_gather_dot(w: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [t, d] float32 @ w[idx].T -> [t, k] float32; w float32 or bfloat16 with unit column stride."""
    x = x.contiguous()
    idx = idx.contiguous().to(torch.int64)
    t, d = x.shape
    out = torch.empty(t, idx.numel(), dtype=torch.float32)
    kernel = cpu_library().gather_dot_bf16 if w.dtype == torch.bfloat16 else cpu_library().gather_dot
    kernel(w.data_ptr(), w.stride(0), idx.data_ptr(), idx.numel(), x.data_ptr(), x.stride(0), t, d, out.data_ptr(),
           out.stride(0), torch.get_num_threads())
    return out


def cpu_gather_axpy(wt: torch.Tensor, idx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """h [t, k] float32 @ wt[idx] -> [t, d] float32; wt float32 or bfloat16 with unit column stride."""
    h = h.contiguous()
    idx = idx.contiguous().to(torch.int64)
    t, k = h.shape
    d = wt.shape[1]
    out = torch.empty(t, d, dtype=torch.float32)
    kernel = cpu_library().gather_axpy_bf16 if wt.dtype == torch.bfloat16 else cpu_library().gather_axpy
    kernel(wt.data_ptr(), wt.stride(0), idx.data_ptr(), k, h.data_ptr(), h.stride(0), t, d, out.data_ptr(),
           out.stride(0), torch.get_num_threads())
    return out


def qmatvec_library():
    """The compiled kernels of csrc/qmatvec.c, or None where no C compiler is available."""
    return load_c_library("qmatvec", _QMATVEC_SIGNATURES)


def cpu_quantized_matvec(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, bits: int) -> torch.Tensor:
    """codes contiguous (the dispatcher checks), x float32; scales as stored (a bf16 checkpoint's are widened per
    call, exactly: an eighth of the codes' bytes)."""
    x, scales = x.contiguous(), scales.float().contiguous()
    t, d = x.shape
    n, groups = scales.shape
    out = torch.empty(t, n, dtype=torch.float32)
    library = qmatvec_library()
    kernel = library.qmatvec_int8 if bits == 8 else library.qmatvec_int4
    kernel(codes.data_ptr(), scales.data_ptr(), n, d, d // groups, x.data_ptr(), x.stride(0), t, out.data_ptr(),
           out.stride(0), torch.get_num_threads())
    return out


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def cpu_select_silu(pre: torch.Tensor, threshold: float, scale: torch.Tensor | None = None,
                    ids: torch.Tensor | None = None, allow: torch.Tensor | None = None):
    """(idx [k], mask [t, k] bool, g [t, k]) of the columns of pre [t, n] that some token keeps: |silu(pre)| *
    scale[id] >= threshold (and allow[t, n]); ids: the neuron of each column (default: the column), g zero where a
    token does not keep its column. See csrc/gather.c select_silu."""
    pre = pre.contiguous()
    t, n = pre.shape
    idx = torch.empty(n, dtype=torch.int64)
    mask = torch.empty(t, n, dtype=torch.bool)
    g = torch.empty(t, n, dtype=torch.float32)
    ids, scale, allow = (None if v is None else v.contiguous() for v in (ids, scale, allow))  # held for the call
    k = cpu_library().select_silu(pre.data_ptr(), pre.stride(0), t, n, _ptr(ids), _ptr(scale), float(threshold),
                                  _ptr(allow), n, idx.data_ptr(), mask.data_ptr(), g.data_ptr())
    return idx[:k], mask[:, :k], g[:, :k]

"""CPU kernels for the activation-sparse MLP: gather fused into the product, so each active neuron's weight row is
read once from memory. torch has no fused gather-GEMV (index_select copies the rows first, which costs about as
much as the dense product on a memory-bound CPU), so this is a few lines of C (csrc/gather.c, built on first use by
cpu_build.py). Without a compiler, `cpu_library()` is None and the torch reference in activation_sparse.py runs
instead (same results, slower)."""
from __future__ import annotations

import ctypes
import functools

import torch

from .cpu_build import load_c_library


def cpu_library():
    """The compiled kernels of csrc/gather.c (ctypes CDLL), or None where no C compiler is available."""
    lib = load_c_library("gather")
    return None if lib is None else _typed(lib)


@functools.lru_cache(maxsize=1)
def _typed(lib):
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.gather_dot, lib.gather_axpy):
        fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64, ptr, i64, ctypes.c_int]
        fn.restype = None
    return lib


def cpu_gather_dot(w: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    idx = idx.contiguous().to(torch.int64)
    t, d = x.shape
    out = torch.empty(t, idx.numel(), dtype=torch.float32)
    cpu_library().gather_dot(w.data_ptr(), w.stride(0), idx.data_ptr(), idx.numel(), x.data_ptr(), x.stride(0),
                             t, d, out.data_ptr(), out.stride(0), torch.get_num_threads())
    return out


def cpu_gather_axpy(wt: torch.Tensor, idx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    h = h.contiguous()
    idx = idx.contiguous().to(torch.int64)
    t, k = h.shape
    d = wt.shape[1]
    out = torch.empty(t, d, dtype=torch.float32)
    cpu_library().gather_axpy(wt.data_ptr(), wt.stride(0), idx.data_ptr(), k, h.data_ptr(), h.stride(0), t, d,
                              out.data_ptr(), out.stride(0), torch.get_num_threads())
    return out

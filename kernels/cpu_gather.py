"""CPU kernels for the activation-sparse MLP: gather fused into the product, so each active neuron's weight row is
read once from memory. torch has no fused gather-GEMV (index_select copies the rows first, which costs about as
much as the dense product on a memory-bound CPU), so this is a few lines of C built with the system C compiler on
first use (~1 s) into a per-user cache, loaded with ctypes. Without a compiler, `cpu_library()` is None and the
torch reference in activation_sparse.py runs instead (same results, slower)."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_SOURCE = r"""
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* out[j, r] = dot(w[idx[r], :d], x[j, :d]). Rows go four at a time: four independent accumulators and four
   memory streams in flight (one row at a time leaves a single dependent FMA chain and one stream: ~1.5x slower
   than a contiguous GEMV over as many rows). */
void gather_dot(const float* w, int64_t ldw, const int64_t* idx, int64_t k, const float* x, int64_t ldx,
                int64_t t, int64_t d, float* out, int64_t ldo, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < k; r += 4) {
        if (r + 4 <= k) {
            const float *w0 = w + idx[r] * ldw, *w1 = w + idx[r + 1] * ldw;
            const float *w2 = w + idx[r + 2] * ldw, *w3 = w + idx[r + 3] * ldw;
            for (int64_t n = r + 4; n < r + 8 && n < k; ++n) __builtin_prefetch(w + idx[n] * ldw);
            for (int64_t j = 0; j < t; ++j) {
                const float* xj = x + j * ldx;
                float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
                #pragma omp simd reduction(+:a0, a1, a2, a3)
                for (int64_t c = 0; c < d; ++c) {
                    a0 += w0[c] * xj[c]; a1 += w1[c] * xj[c]; a2 += w2[c] * xj[c]; a3 += w3[c] * xj[c];
                }
                float* o = out + j * ldo + r;
                o[0] = a0; o[1] = a1; o[2] = a2; o[3] = a3;
            }
        } else {
            for (int64_t q = r; q < k; ++q) {
                const float* row = w + idx[q] * ldw;
                for (int64_t j = 0; j < t; ++j) {
                    const float* xj = x + j * ldx;
                    float acc = 0.f;
                    #pragma omp simd reduction(+:acc)
                    for (int64_t c = 0; c < d; ++c) acc += row[c] * xj[c];
                    out[j * ldo + q] = acc;
                }
            }
        }
    }
}

/* out[j, :d] = sum_r h[j, r] * wt[idx[r], :d]; threads split the d columns (no reduction across threads). Rows go
   four at a time, so out is loaded and stored once per four rows and four streams are in flight. */
void gather_axpy(const float* wt, int64_t ldw, const int64_t* idx, int64_t k, const float* h, int64_t ldh,
                 int64_t t, int64_t d, float* out, int64_t ldo, int nthreads) {
    int64_t block = (d + nthreads - 1) / nthreads;
    block = (block + 15) / 16 * 16;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c0 = 0; c0 < d; c0 += block) {
        int64_t c1 = c0 + block < d ? c0 + block : d;
        for (int64_t j = 0; j < t; ++j)
            for (int64_t c = c0; c < c1; ++c) out[j * ldo + c] = 0.f;
        int64_t r = 0;
        for (; r + 4 <= k; r += 4) {
            const float *w0 = wt + idx[r] * ldw, *w1 = wt + idx[r + 1] * ldw;
            const float *w2 = wt + idx[r + 2] * ldw, *w3 = wt + idx[r + 3] * ldw;
            for (int64_t n = r + 4; n < r + 8 && n < k; ++n) __builtin_prefetch(wt + idx[n] * ldw + c0);
            for (int64_t j = 0; j < t; ++j) {
                const float* hj = h + j * ldh + r;
                float h0 = hj[0], h1 = hj[1], h2 = hj[2], h3 = hj[3];
                if (h0 == 0.f && h1 == 0.f && h2 == 0.f && h3 == 0.f) continue;
                float* oj = out + j * ldo;
                #pragma omp simd
                for (int64_t c = c0; c < c1; ++c) oj[c] += h0 * w0[c] + h1 * w1[c] + h2 * w2[c] + h3 * w3[c];
            }
        }
        for (; r < k; ++r) {
            const float* row = wt + idx[r] * ldw;
            for (int64_t j = 0; j < t; ++j) {
                float hv = h[j * ldh + r];
                if (hv == 0.f) continue;
                float* oj = out + j * ldo;
                #pragma omp simd
                for (int64_t c = c0; c < c1; ++c) oj[c] += hv * row[c];
            }
        }
    }
}
"""


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "compress"


def _build(target: Path) -> bool:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "gather.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        for flags in (["-fopenmp"], ["-fopenmp-simd"]):  # OpenMP threads if the toolchain has them
            cmd = [compiler, "-O3", "-march=native", "-shared", "-fPIC", *flags, str(src), "-o", str(out)]
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                os.replace(out, target)  # atomic: concurrent builders never see half a library
                return True
    return False


@functools.lru_cache(maxsize=1)
def cpu_library():
    """The compiled kernels (ctypes CDLL), or None where no C compiler is available."""
    if os.environ.get("COMPRESS_CPU_KERNELS", "").lower() == "off":
        return None
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
    target = _cache_dir() / f"gather_{digest}.so"
    try:
        if not target.exists() and not _build(target):
            return None
        lib = ctypes.CDLL(str(target))
    except OSError:
        return None
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

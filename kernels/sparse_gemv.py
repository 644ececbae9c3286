"""Packed sparse kernels for decoding and for expanding into a scratch buffer (GPU; tests run them interpreted).

- `nm_gemv(x, values, indices, n, m, in_features)`: x [t <= 16, in] @ W^T reading only the packed values and
  their position bits (2:4 in fp16: 0.5625x the bytes of the dense weight). Each program owns BLOCK_N output rows
  and one slice of the kept values (split-K across programs, fp32 atomics), gathers x at the decoded columns (x is
  a few KB, cache resident) and reduces without tensor cores: at 1-16 tokens the product is memory bound.
- `bitmask_gemv(x, values, bitmask, row_offsets, in_features)`: the same for the 50%-unstructured layout (one
  program per BLOCK_N rows walks K with a running per-row count of kept values).
- `nm_expand(values, indices, n, m, in_features, out)` / `bitmask_expand(values, bitmask, row_offsets,
  in_features, out)`: decode the packed weight into a dense buffer (each dense element written once) for
  decompress-then-cuBLAS at large batches.

References: `nm_linear_reference` / `bitmask_linear_reference` / `nm_decode_reference` /
`bitmask_decode_reference` beside the layouts. Autotuned
on a GPU; fixed configurations under TRITON_INTERPRET=1 (no driver to time with)."""
from __future__ import annotations

import torch

from .dispatch import interpreted
from .sparse_nm import index_bits

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch references run without triton
    triton = None

MAX_GEMV_TOKENS = 16


def gemv_supports_nm(m: int) -> bool:
    """The GEMV kernel decodes fields that never straddle a byte (1, 2 or 4 bits: M = 2, 4, 16)."""
    return 8 % index_bits(m) == 0


if triton is not None:

    @triton.jit
    def _nm_gemv_kernel(x_ptr, v_ptr, idx_ptr, y_ptr, T, N, KEPT, IDX_ROW_BYTES, stride_x, stride_y,
                        NKEEP: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tok = tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        per_split = tl.cdiv(tl.cdiv(KEPT, SPLIT_K), BLOCK_J) * BLOCK_J
        j_begin = pid_k * per_split
        for j0 in range(0, per_split, BLOCK_J):
            j = j_begin + j0 + tl.arange(0, BLOCK_J)
            valid = (rn < N)[:, None] & (j < KEPT)[None, :]
            v = tl.load(v_ptr + rn[:, None].to(tl.int64) * KEPT + j[None, :], mask=valid, other=0.0).to(tl.float32)
            bitpos = j * BITS
            b = tl.load(idx_ptr + rn[:, None].to(tl.int64) * IDX_ROW_BYTES + (bitpos >> 3)[None, :], mask=valid,
                        other=0).to(tl.int32)
            pos = (b >> (bitpos & 7)[None, :]) & ((1 << BITS) - 1)
            col = (j // NKEEP)[None, :] * GROUP + pos
            xg = tl.load(x_ptr + tok[:, None, None] * stride_x + col[None, :, :],
                         mask=(tok < T)[:, None, None] & valid[None, :, :], other=0.0).to(tl.float32)
            acc += tl.sum(xg * v[None, :, :], axis=2)
        out = y_ptr + tok[:, None] * stride_y + rn[None, :]
        omask = (tok < T)[:, None] & (rn < N)[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc, mask=omask)
        else:
            tl.atomic_add(out, acc, mask=omask)

    @triton.jit
    def _bitmask_tile(v_ptr, mask_ptr, count, rn, k0, N, K, MASK_ROW_BYTES, BLOCK_K: tl.constexpr):
        """The dense [rows rn, columns k0 + arange(BLOCK_K)] tile of the bitmask layout (zeros where pruned), the
        in-bounds mask, and each row's count of kept values after it: a row's kept values are contiguous from its
        offset, so a tile's start is the running count, its positions a prefix sum of its bits. Each mask byte is
        loaded once and its 8 bits split in registers (not one load per column: 8x the loads); k0 % 8 == 0."""
        BN: tl.constexpr = rn.shape[0]
        rk = k0 + tl.arange(0, BLOCK_K)
        valid = (rn < N)[:, None] & (rk < K)[None, :]
        rb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        byte = tl.load(mask_ptr + rn[:, None].to(tl.int64) * MASK_ROW_BYTES + rb[None, :],
                       mask=(rn < N)[:, None] & (rb < MASK_ROW_BYTES)[None, :], other=0).to(tl.int32)
        bits = tl.reshape((byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1, (BN, BLOCK_K))
        bit = tl.where(valid, bits, 0)
        w = tl.load(v_ptr + count[:, None] + tl.cumsum(bit, axis=1) - bit, mask=bit == 1, other=0.0)
        return w, valid, count + tl.sum(bit, axis=1)

    @triton.jit
    def _bitmask_gemv_kernel(x_ptr, v_ptr, mask_ptr, off_ptr, y_ptr, T, N, K, MASK_ROW_BYTES, stride_x, stride_y,
                             BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        tok = tl.arange(0, BLOCK_T)
        count = tl.load(off_ptr + rn, mask=rn < N, other=0)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            w, valid, count = _bitmask_tile(v_ptr, mask_ptr, count, rn, k0, N, K, MASK_ROW_BYTES, BLOCK_K)
            w = w.to(tl.float32)
            x = tl.load(x_ptr + tok[:, None] * stride_x + rk[None, :], mask=(tok < T)[:, None] & (rk < K)[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        tl.store(y_ptr + tok[:, None] * stride_y + rn[None, :], acc, mask=(tok < T)[:, None] & (rn < N)[None, :])

    @triton.jit
    def _bitmask_expand_kernel(v_ptr, mask_ptr, off_ptr, out_ptr, N, K, MASK_ROW_BYTES, stride_o,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Rows of the bitmask layout decoded left to right into `out` (one program per block of rows)."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        count = tl.load(off_ptr + rn, mask=rn < N, other=0)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            w, valid, count = _bitmask_tile(v_ptr, mask_ptr, count, rn, k0, N, K, MASK_ROW_BYTES, BLOCK_K)
            tl.store(out_ptr + rn[:, None].to(tl.int64) * stride_o + rk[None, :], w.to(out_ptr.dtype.element_ty),
                     mask=valid)

    @triton.jit
    def _nm_expand_kernel(v_ptr, idx_ptr, out_ptr, N, K, KEPT, IDX_ROW_BYTES, stride_o,
                          NKEEP: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        valid = (rn < N)[:, None] & (rc < K)[None, :]
        group = rc // GROUP
        w = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for t in tl.static_range(NKEEP):  # column c holds kept value t of its group if that value's position is c % m
            j = group * NKEEP + t
            v = tl.load(v_ptr + rn[:, None].to(tl.int64) * KEPT + j[None, :], mask=valid, other=0.0).to(tl.float32)
            bitpos = j * BITS
            row = idx_ptr + rn[:, None].to(tl.int64) * IDX_ROW_BYTES
            byte = bitpos >> 3
            b = tl.load(row + byte[None, :], mask=valid, other=0).to(tl.int32)
            if 8 % BITS != 0:  # a 3-bit field (4:8) may straddle two bytes
                b |= tl.load(row + byte[None, :] + 1, mask=valid & ((byte + 1) < IDX_ROW_BYTES)[None, :],
                             other=0).to(tl.int32) << 8
            pos = (b >> (bitpos & 7)[None, :]) & ((1 << BITS) - 1)
            w += tl.where(pos == (rc % GROUP)[None, :], v, 0.0)
        tl.store(out_ptr + rn[:, None].to(tl.int64) * stride_o + rc[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=valid)

    def _tile_fits_registers(configs, named_args, **kwargs):
        """Configurations whose [tokens, rows, columns] product tile holds at most 64 fp32 values per thread (and,
        from 4 tokens on, at least 32). Above 64, compiled for sm_90 (compile_check.py), tiles spilled 0.2-17.5 KB
        of stack per thread (16 tokens x 64 x 128: 17.5 KB) and took ptxas minutes on the first call of every shape; below 32 (from 4 tokens on) a thread has little
        to overlap, and every configuration kept costs the autotuner a timed run per shape (8-34 of 36 / 4-17 of
        18 kept)."""
        tokens = {**named_args, **kwargs}["BLOCK_T"]

        def per_thread(c):
            return tokens * c.kwargs["BLOCK_N"] * c.kwargs.get("BLOCK_J", c.kwargs.get("BLOCK_K")) / (32 * c.num_warps)

        low = 32 if tokens >= 4 else 0  # at 1-2 tokens small many-program tiles may win: not measured, all kept
        return ([c for c in configs if low <= per_thread(c) <= 64] or [c for c in configs if per_thread(c) <= 64]
                or [min(configs, key=per_thread)])

    def _autotune(configs, key, **options):
        """triton.autotune with a short timing per candidate (5 ms warmup + 20 ms: a decode GEMV takes tens of
        microseconds, so hundreds of runs; the default 25 + 100 ms made tuning 34 candidates per shape cost seconds) and the choice cached
        on disk across processes, where this Triton has those options (3.3+)."""
        def quick(fn, quantiles):
            return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

        try:
            return triton.autotune(configs, key, **options, do_bench=quick, cache_results=True)
        except TypeError:
            return triton.autotune(configs, key, **options)

    _GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_J": bj, "SPLIT_K": sk}, num_warps=w)
                     for bn in (16, 32, 64) for bj in (32, 64, 128) for sk in (1, 4) for w in (4, 8)]
    _nm_gemv_tuned = _autotune(_GEMV_CONFIGS, key=["N", "KEPT", "BLOCK_T"], reset_to_zero=["y_ptr"],
                               prune_configs_by={"early_config_prune": _tile_fits_registers})(_nm_gemv_kernel)
    _bitmask_gemv_tuned = _autotune(
        [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w) for bn in (8, 16, 32) for bk in (64, 128, 256)
         for w in (4, 8)],
        key=["N", "K", "BLOCK_T"], prune_configs_by={"early_config_prune": _tile_fits_registers})(
        _bitmask_gemv_kernel)


def nm_gemv(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] with at most MAX_GEMV_TOKENS rows @ W^T (+ bias), W packed N:M; output in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    t, rows, kept = x2.shape[0], values.shape[0], values.shape[1]
    y = torch.zeros(t, rows, dtype=torch.float32, device=x.device)
    args = (x2, values, indices, y, t, rows, kept, indices.shape[1], x2.stride(0), y.stride(0))
    meta = dict(NKEEP=n, GROUP=m, BITS=index_bits(m), BLOCK_T=max(2, triton.next_power_of_2(t)))
    if interpreted():
        grid = (triton.cdiv(rows, 16), 2)
        _nm_gemv_kernel[grid](*args, **meta, BLOCK_N=16, BLOCK_J=32, SPLIT_K=2)
    else:
        _nm_gemv_tuned[lambda c: (triton.cdiv(rows, c["BLOCK_N"]), c["SPLIT_K"])](*args, **meta)
    if bias is not None:
        y += bias
    return y.to(x.dtype).view(*lead, rows)


def bitmask_gemv(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor,
                 in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    t, rows = x2.shape[0], bitmask.shape[0]
    y = torch.empty(t, rows, dtype=torch.float32, device=x.device)
    args = (x2, values, bitmask, row_offsets, y, t, rows, in_features, bitmask.shape[1], x2.stride(0), y.stride(0))
    block_t = max(2, triton.next_power_of_2(t))
    if interpreted():
        _bitmask_gemv_kernel[(triton.cdiv(rows, 8),)](*args, BLOCK_T=block_t, BLOCK_N=8, BLOCK_K=32)
    else:
        _bitmask_gemv_tuned[lambda c: (triton.cdiv(rows, c["BLOCK_N"]),)](*args, BLOCK_T=block_t)
    if bias is not None:
        y += bias
    return y.to(x.dtype).view(*lead, rows)


def nm_expand(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int,
              out: torch.Tensor) -> torch.Tensor:
    """Decode the packed N:M weight into `out` [rows, in] (e.g. a view of a reused scratch buffer); returns `out`."""
    rows, kept = values.shape
    block_n, block_c = (16, 32) if interpreted() else (32, 128)
    grid = (triton.cdiv(rows, block_n), triton.cdiv(in_features, block_c))
    _nm_expand_kernel[grid](values, indices, out, rows, in_features, kept, indices.shape[1], out.stride(0),
                            NKEEP=n, GROUP=m, BITS=index_bits(m), BLOCK_N=block_n, BLOCK_C=block_c,
                            num_warps=4)
    return out


def bitmask_expand(values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, in_features: int,
                   out: torch.Tensor) -> torch.Tensor:
    """Decode the packed bitmask weight into `out` [rows, in] (a view of a reused scratch buffer); returns `out`."""
    rows = bitmask.shape[0]
    # 4 rows per program: rows / 4 programs walk K (1,024 at 4,096 rows; not measured on a GPU yet)
    block_n, block_k = (8, 32) if interpreted() else (4, 256)
    _bitmask_expand_kernel[(triton.cdiv(rows, block_n),)](values, bitmask, row_offsets, out, rows, in_features,
                                                         bitmask.shape[1], out.stride(0), BLOCK_N=block_n,
                                                         BLOCK_K=block_k, num_warps=4)
    return out

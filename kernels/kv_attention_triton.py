"""Triton flash-decoding kernel over the paged compressed KV storage (kv_pages.py); its torch reference is
kv_attention_reference.py, the dispatcher kv_attention.py.

One program = one (batch row, KV head) x a block of query rows (all query heads of that KV head times the new
tokens, GQA: the storage is read once for all of them) x one split of the chunks (flash-decoding: the context is
split over programs so a small batch still fills the GPU; each split writes a partial max / sum / output and
`_combine_splits` merges them). Per chunk of C tokens: the page and the chunk's place in it come from the page table
(a table of pointers, one per page and field); codes are unpacked and dequantized in registers, the scale/zero rows
and outliers loaded compactly and broadcast over their group; the outliers are added to the dequantized tile
(2 x per_side selects per group, no one-hot product); the low-rank span as two small products ((q @ U) @ A^T for
keys, (p @ A) @ U^T for values); the dots in fp16 with fp32 accumulation on a GPU (fp32 under the interpreter).
The last split also reads the fp16 window.

Tiles: C = chunk length tokens x D (head_dim 64/128/256); `launch_config` picks warps and pipeline stages per
head_dim. compile_check.py compiles the kernel for sm_90 without a GPU and reads the shared memory, registers and
spills ptxas gives it (tests/kernels/test_compile_check.py: within an H100/H200 block at every head_dim and format)."""
from __future__ import annotations

import math

import torch

from .kv_attention_reference import _fold_queries, attention_bias
from .dispatch import interpreted, power_of_two as _pow2
from .kv_pages import PAGE_FIELDS, num_tokens, page_table

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch reference runs without triton
    triton = None

ROW_BLOCK = 16                # query rows per program (tl.dot needs >= 16)
RANK_BLOCK = 16               # low-rank columns, padded for tl.dot
WINDOW_BLOCK = 32
CODES, SCALE, ZERO, OVAL, OOFF, FACTOR, BASIS = range(len(PAGE_FIELDS))


def launch_config(head_dim: int) -> dict:
    """Warps and software-pipeline stages per head_dim, compared by compiling for sm_90 (`compile_check --sass`): at
    128, 8 warps stopped a 52 B spill with a padding mask but made the fp16 scale/zero loads per element (GEAR-4:
    440 global load instructions per chunk against 106 at 4 warps), so 4; at 256 one stage keeps the tile under an
    sm_89 block's 99 KB."""
    return {64: dict(num_warps=4, num_stages=3), 128: dict(num_warps=4, num_stages=2),
            256: dict(num_warps=8, num_stages=1)}.get(head_dim, dict(num_warps=4, num_stages=1))


if triton is not None:
    from .kv_quant import load_code_tile

    @triton.jit
    def _ptr(tbl, n_pages, store, field, page, DTYPE: tl.constexpr):
        return tl.load(tbl + (store * 7 + field) * n_pages + page).to(tl.pointer_type(DTYPE))

    @triton.jit
    def _expand(x, A: tl.constexpr, B: tl.constexpr, G: tl.constexpr, AXIS: tl.constexpr):
        """x [A, B] with every entry repeated G times along AXIS: [A*G, B] (AXIS 0) or [A, B*G] (AXIS 1)."""
        # one return: the compiler type-checks every return statement, even one a constexpr branch skips
        if AXIS == 0:
            out = tl.reshape(tl.broadcast_to(x[:, None, :], (A, G, B)), (A * G, B))
        else:
            out = tl.reshape(tl.broadcast_to(x[:, :, None], (A, B, G)), (A, B * G))
        return out

    @triton.jit
    def _scales(tbl, n_pages, store, page, offs, SCALE8: tl.constexpr):
        """The page's scales at offs (fp32): fp16, or log8 bytes u -> 2^(u/8 - 17) (kv_scale.py)."""
        if SCALE8:
            u = tl.load(_ptr(tbl, n_pages, store, 1, page, tl.uint8) + offs).to(tl.float32)
            out = tl.exp2(u * 0.125 - 17.0)
        else:
            out = tl.load(_ptr(tbl, n_pages, store, 1, page, tl.float16) + offs).to(tl.float32)
        return out

    @triton.jit
    def _dequant_tile(tbl, n_pages, store, page, i, k_p, bh, D: tl.constexpr, C: tl.constexpr, G: tl.constexpr,
                      BITS: tl.constexpr, PER: tl.constexpr, KEYS: tl.constexpr, ALIGN16: tl.constexpr,
                      SCALE8: tl.constexpr):
        """K_hat or V_hat [C, D] (fp32) of chunk i of a page of k_p chunks: codes * scale + zero + outliers."""
        t = tl.arange(0, C)
        d = tl.arange(0, D)
        W: tl.constexpr = D * BITS // 8
        codes = _ptr(tbl, n_pages, store, 0, page, tl.uint8)
        if ALIGN16:  # every page's codes 16-byte aligned and W a multiple of 16 (checked on the host): saying so
            # lets the compiler copy rows of codes in 16-byte vectors, asynchronously, ahead of their use
            codes = tl.multiple_of(codes, 16)
        codes += bh * k_p * C * W
        x = load_code_tile(codes, i * C + t, t >= 0, D, BITS).to(tl.float32)
        if KEYS:  # stats [C/G, D]: one row per group of G tokens
            NT: tl.constexpr = C // G
            tg = tl.arange(0, NT)
            stat = (bh * k_p * NT + i * NT + tg)[:, None] * D + d[None, :]
            scale = _expand(_scales(tbl, n_pages, store, page, stat, SCALE8), NT, D, G, 0)
            zero = _expand(tl.load(_ptr(tbl, n_pages, store, 2, page, tl.float16) + stat).to(tl.float32), NT, D, G, 0)
        else:     # stats [C, D/G]: one column per group of G channels
            NG: tl.constexpr = D // G
            gi = tl.arange(0, NG)
            stat = (bh * k_p * C + i * C + t)[:, None] * NG + gi[None, :]
            scale = _expand(_scales(tbl, n_pages, store, page, stat, SCALE8), C, NG, G, 1)
            zero = _expand(tl.load(_ptr(tbl, n_pages, store, 2, page, tl.float16) + stat).to(tl.float32), C, NG, G, 1)
        x = x * scale + zero
        if PER > 0:  # outliers: the correction added at its offset inside each group
            oval = _ptr(tbl, n_pages, store, 3, page, tl.float16)
            ooff = _ptr(tbl, n_pages, store, 4, page, tl.uint8)
            if KEYS:
                NOUT: tl.constexpr = (C // G) * D * PER
                slot = (bh * k_p + i) * NOUT + (tg[:, None] * D + d[None, :]) * PER
                inner = t % G
                for j in tl.static_range(PER):
                    off = _expand(tl.load(ooff + slot + j).to(tl.int32), C // G, D, G, 0)
                    val = _expand(tl.load(oval + slot + j).to(tl.float32), C // G, D, G, 0)
                    x += tl.where(inner[:, None] == off, val, 0.0)
            else:
                NOUT: tl.constexpr = C * (D // G) * PER
                slot = (bh * k_p + i) * NOUT + (t[:, None] * (D // G) + tl.arange(0, D // G)[None, :]) * PER
                inner = d % G
                for j in tl.static_range(PER):
                    off = _expand(tl.load(ooff + slot + j).to(tl.int32), C, D // G, G, 1)
                    val = _expand(tl.load(oval + slot + j).to(tl.float32), C, D // G, G, 1)
                    x += tl.where(inner[None, :] == off, val, 0.0)
        return x

    @triton.jit
    def _factors(tbl, n_pages, store, page, i, k_p, bh, rank, D: tl.constexpr, C: tl.constexpr,
                 RB: tl.constexpr, A_FP8: tl.constexpr):
        """The page's basis U [D, RB] and chunk i's token factors A [C, RB] (fp32, zero beyond the page's rank)."""
        j = tl.arange(0, RB)
        t = tl.arange(0, C)
        d = tl.arange(0, D)
        rm = j < rank
        u = tl.load(_ptr(tbl, n_pages, store, 6, page, tl.float16) + (bh * D + d)[:, None] * rank + j[None, :],
                    mask=rm[None, :], other=0.0).to(tl.float32)
        offs = (bh * k_p * C + i * C + t)[:, None] * rank + j[None, :]
        if A_FP8:
            a = _e4m3_to_f32(tl.load(_ptr(tbl, n_pages, store, 5, page, tl.uint8) + offs, mask=rm[None, :], other=0))
        else:
            a = tl.load(_ptr(tbl, n_pages, store, 5, page, tl.float16) + offs, mask=rm[None, :], other=0.0)
            a = a.to(tl.float32)
        return u, a

    @triton.jit
    def _e4m3_to_f32(b):
        """fp8 e4m3fn bytes -> float32 by bit arithmetic (an A100, sm_80, has no fp8 conversion: Triton refuses to
        compile `float8e4nv` for it): 2^(e - 7) (1 + m / 8), or m 2^-9 for e = 0. (NaN, S.1111.111, reads 480:
        the cache never stores it.)"""
        b = b.to(tl.int32)
        e = (b >> 3) & 15
        m = b & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
        # the sign as a bit: triton 3.6 negates as 0 - v, which turns the byte 0x80 (-0.0) into +0.0
        return (v.to(tl.int32, bitcast=True) | ((b & 128) << 24)).to(tl.float32, bitcast=True)

    @triton.jit
    def _dot(a, b, DOT16: tl.constexpr):
        if DOT16:
            return tl.dot(a.to(tl.float16), b.to(tl.float16))
        return tl.dot(a, b, input_precision="ieee")

    @triton.jit
    def _paged_decode_kernel(
            q_ptr, acc_ptr, m_ptr, l_ptr, bias_ptr, wk_ptr, wv_ptr, tbl, ranks,
            n_pages, n_chunks, P, W, H, L, R, chunks_per_split,
            D: tl.constexpr, C: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr,
            PK: tl.constexpr, PV: tl.constexpr, K_LR: tl.constexpr, V_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
            ROWS: tl.constexpr, RB: tl.constexpr, BLOCK_W: tl.constexpr, DOT16: tl.constexpr,
            A_FP8: tl.constexpr, ALIGN16: tl.constexpr, SCALE8: tl.constexpr, BITS_V: tl.constexpr):
        bh = tl.program_id(0)  # (32-bit offsets: triton_supports sends pages of 2^31 elements or more elsewhere)
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        split = tl.program_id(2)
        n_splits = tl.num_programs(2)
        row_mask = rows < R
        d = tl.arange(0, D)
        t = tl.arange(0, C)
        q = tl.load(q_ptr + (bh * R + rows)[:, None] * D + d[None, :], mask=row_mask[:, None], other=0.0)
        kv_len = n_chunks * C + W
        bias_rows = bias_ptr + ((bh // H) * L + rows % L) * kv_len
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, D], dtype=tl.float32)
        c0 = split * chunks_per_split
        c1 = tl.minimum(c0 + chunks_per_split, n_chunks)
        for c in range(c0, c1):
            page = c // P
            i = c - page * P
            k_p = tl.minimum(P, n_chunks - page * P)
            k_hat = _dequant_tile(tbl, n_pages, 0, page, i, k_p, bh, D, C, GK, BITS, PK, True, ALIGN16, SCALE8)
            s = _dot(q, tl.trans(k_hat), DOT16)
            if K_LR:
                u, a = _factors(tbl, n_pages, 0, page, i, k_p, bh, tl.load(ranks + page), D, C, RB, A_FP8)
                s += _dot(_dot(q, u, DOT16), tl.trans(a), DOT16)
            if HAS_BIAS:
                s += tl.load(bias_rows[:, None] + c * C + t[None, :], mask=row_mask[:, None], other=0.0)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_hat = _dequant_tile(tbl, n_pages, 1, page, i, k_p, bh, D, C, GV, BITS_V, PV, False, ALIGN16, SCALE8)
            acc = acc * alpha[:, None] + _dot(p, v_hat, DOT16)
            if V_LR:
                rank = tl.load(ranks + n_pages + page)
                u, a = _factors(tbl, n_pages, 1, page, i, k_p, bh, rank, D, C, RB, A_FP8)
                acc += _dot(_dot(p, a, DOT16), tl.trans(u), DOT16)
            m_i = m_new
        if split == n_splits - 1:
            w = tl.arange(0, BLOCK_W)
            for w0 in range(0, W, BLOCK_W):
                wm = w0 + w < W
                offs = (bh * W + w0 + w)[:, None] * D + d[None, :]
                k = tl.load(wk_ptr + offs, mask=wm[:, None], other=0.0).to(tl.float32)
                s = _dot(q, tl.trans(k), DOT16)
                if HAS_BIAS:
                    s += tl.load(bias_rows[:, None] + n_chunks * C + w0 + w[None, :],
                                 mask=row_mask[:, None] & wm[None, :], other=0.0)
                s = tl.where(wm[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = tl.load(wv_ptr + offs, mask=wm[:, None], other=0.0).to(tl.float32)
                acc = acc * alpha[:, None] + _dot(p, v, DOT16)
                m_i = m_new
        part = (bh * R + rows) * n_splits + split
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=row_mask[:, None])
        tl.store(m_ptr + part, m_i, mask=row_mask)
        tl.store(l_ptr + part, l_i, mask=row_mask)


def _combine_splits(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Merge per-split softmax partials: acc [..., S, D], m and l [..., S] -> [..., D]. Empty splits (m = -inf,
    l = 0) weigh nothing."""
    weight = torch.exp(m - m.amax(-1, keepdim=True))
    return (acc * weight.unsqueeze(-1)).sum(-2) / (l * weight).sum(-1, keepdim=True)


def triton_supports(keys, values, d: int) -> bool:
    """Shapes the kernel tiles: power-of-two head_dim >= 16, chunk >= 16 and group sizes dividing them, the same
    page structure and scale format for keys and values (their bits may differ), every page but the last full and
    under 2^31 elements a tensor, ranks <= RANK_BLOCK."""
    if not (_pow2(d) and d >= 16):
        return False
    if num_tokens(keys) == 0:
        return True
    c = keys.chunk_len
    return (_pow2(c) and c >= 16 and keys.chunk_len == values.chunk_len
            and keys.page_chunks == values.page_chunks and _pow2(keys.group_size) and keys.group_size <= c
            and _pow2(values.group_size) and values.group_size <= d and len(keys.pages) == len(values.pages)
            and all(k.codes.shape[2] == v.codes.shape[2] for k, v in zip(keys.pages, values.pages))
            # the kernel finds a chunk's page by arithmetic: every page but the last full (the cache's are)
            and all(p.codes.shape[2] == keys.page_chunks * c for p in keys.pages[:-1])
            # its offsets are 32-bit (64-bit ones spill registers at head_dim 256): a page past 2^31 elements, e.g.
            # page_chunks 1024 x 128 tokens at batch 8 x 32 heads, goes to the C kernel / reference
            and all(t.numel() < 2 ** 31 for p in keys.pages + values.pages for t in p.tensors())
            and max([p.rank for p in keys.pages + values.pages] + [0]) <= RANK_BLOCK
            and len({p.a.dtype for p in keys.pages + values.pages if p.a is not None}) <= 1
            and len({p.scale.dtype for p in keys.pages + values.pages}) == 1)


def codes_aligned(pages, d: int, bits: int) -> bool:
    """Every row of codes the kernel reads starts 16-byte aligned: rows of W = d * bits / 8 bytes (a multiple of
    16), pages contiguous (page_table refuses others) from a 16-byte aligned address. The kernel then says so to the
    compiler (ALIGN16), which copies codes in vectors; a false claim would read misaligned memory on a GPU."""
    return d * bits // 8 % 16 == 0 and all(p.codes.data_ptr() % 16 == 0 for p in pages)


def _splits(q: torch.Tensor, programs: int, n_chunks: int) -> int:
    """About two programs per SM, each split with at least 4 chunks."""
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    return max(1, min(max(1, 2 * sms // programs), n_chunks // 4))


def compressed_attention_triton(query, keys, values, window_keys, window_values, mask=None, softmax_scale=None,
                                splits: int | None = None):
    b, hq, l, d = query.shape
    h, w = window_keys.shape[1], window_keys.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q = (_fold_queries(query, h) * scale).contiguous()
    rows = q.shape[2]
    n = num_tokens(keys)
    if n + w == 0:
        raise ValueError("attention over an empty cache")
    bias = attention_bias(mask, b, l, n + w, q.device)
    dummy = q.new_zeros(1)
    wk, wv = (window_keys.contiguous(), window_values.contiguous()) if w else (dummy, dummy)
    if n:
        tbl, ranks = page_table([keys, values], q.device)
        c, p_chunks, n_pages = keys.chunk_len, keys.page_chunks, len(keys.pages)
        pk, pv = keys.per_group, values.per_group
        k_lr, v_lr = any(p.rank for p in keys.pages), any(p.rank for p in values.pages)
        gk, gv, bits, bits_v = keys.group_size, values.group_size, keys.bits, values.bits
        a_fp8 = any(p.a is not None and p.a.element_size() == 1 for p in keys.pages + values.pages)
        align16 = codes_aligned(keys.pages, d, bits) and codes_aligned(values.pages, d, bits_v)
        scale8 = keys.pages[0].scale.dtype == torch.uint8
    else:
        tbl, ranks = torch.zeros(1, dtype=torch.int64, device=q.device), torch.zeros(2, dtype=torch.int32,
                                                                                     device=q.device)
        c, p_chunks, n_pages, pk, pv, k_lr, v_lr, gk, gv, bits, a_fp8 = 16, 1, 1, 0, 0, False, False, 16, 16, 8, False
        bits_v = bits
        align16 = scale8 = False
    n_chunks = n // c
    row_blocks = triton.cdiv(rows, ROW_BLOCK)
    splits = splits or _splits(q, b * h * row_blocks, n_chunks)
    splits = max(1, min(splits, max(n_chunks, 1)))
    per_split = -(-n_chunks // splits)
    acc = q.new_empty(b * h, rows, splits, d)
    m, lse = q.new_empty(b * h, rows, splits), q.new_empty(b * h, rows, splits)
    _paged_decode_kernel[(b * h, row_blocks, splits)](
        q, acc, m, lse, bias.contiguous() if bias is not None else dummy, wk, wv, tbl, ranks,
        n_pages, n_chunks, p_chunks, w, h, l, rows, per_split,
        D=d, C=c, GK=gk, GV=gv, BITS=bits, PK=pk, PV=pv, K_LR=k_lr, V_LR=v_lr, HAS_BIAS=bias is not None,
        ROWS=ROW_BLOCK, RB=RANK_BLOCK, BLOCK_W=WINDOW_BLOCK, DOT16=not interpreted(), A_FP8=a_fp8, ALIGN16=align16,
        SCALE8=scale8, BITS_V=bits_v, **launch_config(d))
    return _combine_splits(acc, m, lse).view(b, hq, l, d).to(query.dtype)

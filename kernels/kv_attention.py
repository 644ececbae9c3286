"""Decode attention that reads the compressed KV storage directly (codes + scales, low-rank factors, outliers) plus
the fp16 window of recent tokens, never building a dense K or V of the past.

Storage (the shared spec; see kv_quant.py for the codes): per (batch row b, KV head h), N compressed tokens in
chunks of C (= residual_length), D = head_dim:
- keys   codes uint8 [B, H, N, D*bits/8], scale/zero fp16 [B, H, N/G, D]  (groups of G tokens per channel)
- values codes uint8 [B, H, N, D*bits/8], scale/zero fp16 [B, H, N, D/G]  (groups of G channels per token)
- outliers fp16 values (corrections) and int16/int32 flat in-chunk positions t*D + d, [B, H, n_chunks, k]
- low-rank segments: runs of chunks sharing a rank r, each A fp16 [B, H, chunks*C, r], Bf fp16 [B, H, chunks, D, r]
Any object with these attributes works as a store (`codes, scale, zero, bits, group_size, chunk_len,
outlier_values, outlier_positions, segments` with `first_chunk, a, b`): the cache's CompressedStore, or the
`CompressedKV` below.

The math, with scores for keys and p.V for values (GQA: the Hq = H * groups query heads are folded onto their KV
head, so each KV head's storage is read once for all its query heads):
  q.k_t  = sum_d (q_d * scale_gd) * code_td + sum_d q_d * zero_gd + (q @ Bf_c) . A_t + sum_{(t,d) in S} q_d * s_td
  p.V_d  = sum_t (p_t * scale_tg) * code_td + sum_t p_t * zero_tg + ((p_c @ A_c) @ Bf_c^T)_d + sum_{(t,d) in S} p_t s_td
then concatenated with the window's q.K_w^T, scaled, masked, softmaxed.

Public: `compressed_decode_attention` runs the Triton kernel on CUDA tensors and `compressed_attention_reference`
(torch, blocks of at most REFERENCE_BLOCK_TOKENS tokens) elsewhere. The kernel: one program per (b, KV head, block
of 16 query rows, split of the chunks); rows are the query heads of that KV head times the new tokens, so the
compressed storage is read once for all of them; per chunk an online-softmax step with fused unpack + dequantize
+ dot (tl.dot in fp32, "ieee"), the low-rank term through the factors, the outliers as products with one-hot
tiles; the last split also reads the fp16 window; the splits' partials are merged by `_combine_splits`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .dispatch import use_triton
from .kv_quant import code_lanes, unpack_codes

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch reference runs without triton
    triton = None

# Compressed tokens unpacked at a time by the torch reference: bounds its temporaries (float codes) to
# B * H * REFERENCE_BLOCK_TOKENS * D floats however long the context.
REFERENCE_BLOCK_TOKENS = 4096
MASKED = torch.finfo(torch.float32).min  # finite, so a fully masked row (left padding) stays finite
# Query rows per Triton program (tl.dot needs 16): the query heads sharing a KV head, times the new tokens.
ROW_BLOCK = 16


@dataclass
class LowRank:
    first_chunk: int
    a: torch.Tensor  # fp16 [B, H, chunks*C, r]
    b: torch.Tensor  # fp16 [B, H, chunks, D, r]


@dataclass
class CompressedKV:
    """The compressed keys (axis "token") or values (axis "channel") of one layer, in the shared format."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    chunk_len: int
    outlier_values: torch.Tensor | None = None
    outlier_positions: torch.Tensor | None = None
    segments: list = field(default_factory=list)


def _num_tokens(store) -> int:
    return 0 if store is None or store.codes is None else store.codes.shape[2]


def _head_dim(store) -> int:
    return store.codes.shape[-1] * 8 // store.bits


def _fold_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, L, D] -> fp32 [B, H, groups*L, D]; row i*L + l is query head h*groups + i at step l."""
    b, hq, l, d = query.shape
    if hq % kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of {kv_heads} KV heads")
    return query.float().reshape(b, kv_heads, (hq // kv_heads) * l, d)


def attention_bias(mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int,
                   device: torch.device) -> torch.Tensor | None:
    """Any accepted mask -> additive fp32 bias [B, L, KV] (None: nothing masked).

    mask: None (causal when L > 1: query l sits at position KV - L + l), or bool (True = attend) / additive float,
    shaped [B, KV] (keys only), [B, L, KV] or [B, 1, L, KV]; a longer last axis is cut to its last KV entries."""
    if mask is None:
        if q_len == 1:
            return None
        pos_q = torch.arange(kv_len - q_len, kv_len, device=device).view(-1, 1)
        causal = torch.arange(kv_len, device=device).view(1, -1) > pos_q
        return torch.zeros(q_len, kv_len, device=device).masked_fill(causal, MASKED).expand(batch, -1, -1)
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError("per-head attention masks are not supported: pass a mask with a head axis of 1")
        mask = mask[:, 0]
    if mask.dim() == 2:
        mask = mask[:, None, :]
    mask = mask[..., -kv_len:]
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, device=device).masked_fill(~mask, MASKED)
    else:
        bias = mask.float().clamp(min=MASKED)
    return bias.expand(batch, q_len, kv_len)


# ---------------------------------------------------------------------------------------------- torch reference
def _key_scores_block(q: torch.Tensor, keys, n0: int, n1: int) -> torch.Tensor:
    """q [B, H, R, D] . K_hat^T over compressed tokens [n0, n1) from codes and scales: [B, H, R, n1 - n0].

    Works lane by lane (see `code_lanes`): lane j holds channels j::lanes, so no interleaved copy of the codes is
    made, each lane's uint8 codes are converted to float once, and the lanes accumulate in one baddbmm each, on
    top of the groups' q . zero."""
    b, h, r, d = q.shape
    g, t = keys.group_size, n1 - n0
    lanes = code_lanes(keys.codes[:, :, n0:n1], keys.bits)
    stride, batch = len(lanes), b * h * (t // g)
    scale = keys.scale[:, :, n0 // g:n1 // g].float()                    # [B, H, T/G, D]
    zero = keys.zero[:, :, n0 // g:n1 // g].float()
    # q_d * scale_gd, split by lane: [lanes, B*H*T/G, R, D/lanes]
    qs = (q.unsqueeze(2) * scale.unsqueeze(3)).view(batch, r, d // stride, stride).movedim(-1, 0).contiguous()
    s = (zero @ q.transpose(-1, -2)).view(batch, r, 1)                   # q . zero, once per group
    for j, lane in enumerate(lanes):
        s = torch.baddbmm(s, qs[j], lane.view(batch, g, d // stride).float().transpose(1, 2))  # [.., R, G]
    return s.view(b, h, t // g, r, g).permute(0, 1, 3, 2, 4).reshape(b, h, r, t)


def _value_mix_block(p: torch.Tensor, values, n0: int, n1: int) -> torch.Tensor:
    """p [B, H, R, n1 - n0] . V_hat over compressed tokens [n0, n1): [B, H, R, D] (lane by lane, as above; each
    lane's product starts from the groups' p . zero)."""
    b, h, r, t = p.shape
    g = values.group_size
    lanes = code_lanes(values.codes[:, :, n0:n1], values.bits)
    stride = len(lanes)
    d = lanes[0].shape[-1] * stride
    ng = d // g
    scale = values.scale[:, :, n0:n1].float()                           # [B, H, T, D/G]
    zero = values.zero[:, :, n0:n1].float()
    ps = p.unsqueeze(2) * scale.permute(0, 1, 3, 2).unsqueeze(3)          # [B, H, D/G, R, T]
    pz = (p @ zero).permute(0, 1, 3, 2).unsqueeze(-1)                    # [B, H, D/G, R, 1]: p . zero per group
    if g % stride:  # a group boundary inside a lane's channel run: interleave the codes (rare shapes)
        codes = unpack_codes(values.codes[:, :, n0:n1], values.bits).float()
        out = pz + ps @ codes.view(b, h, t, ng, g).permute(0, 1, 3, 2, 4)  # [B, H, D/G, R, G]
        return out.permute(0, 1, 3, 2, 4).reshape(b, h, r, d)
    if ng == 1:  # one group per token (G = D): plain batched products
        ps, pz = ps.view(b * h, r, t), pz.view(b * h, r, 1)
        per_lane = [torch.baddbmm(pz, ps, lane.view(b * h, t, d // stride).float()) for lane in lanes]
        return torch.stack(per_lane, -1).view(b, h, r, d)
    per_lane = []
    for lane in lanes:  # lane j: channels j::stride; group gi holds lane entries gi*G/stride ...
        codes = lane.view(b, h, t, ng, g // stride).float().permute(0, 1, 3, 2, 4)
        per_lane.append((pz + ps @ codes).permute(0, 1, 3, 2, 4).reshape(b, h, r, d // stride))
    return torch.stack(per_lane, -1).view(b, h, r, d)


def _lowrank_scores(q: torch.Tensor, keys, scores: torch.Tensor) -> None:
    """scores += (q @ Bf_c) @ A_c^T for every chunk with a low-rank term (never forms A Bf^T): one product of q
    with all chunks' channel factors, then one multiply-add per rank component (ranks are small)."""
    b, h, r, d = q.shape
    c = keys.chunk_len
    for seg in keys.segments:
        nc, rank = seg.b.shape[2], seg.b.shape[-1]
        bf = seg.b.permute(0, 1, 3, 2, 4).reshape(b, h, d, nc * rank).float()
        qb = (q @ bf).view(b, h, r, nc, 1, rank)                              # q @ Bf_c for every chunk
        a = seg.a.float().view(b, h, 1, nc, c, rank)
        part = scores[..., seg.first_chunk * c:(seg.first_chunk + nc) * c].view(b, h, r, nc, c)
        for k in range(rank):
            part.addcmul_(qb[..., k], a[..., k])


def _lowrank_mix(p: torch.Tensor, values, out: torch.Tensor) -> None:
    """out += sum_c (p_c @ A_c) @ Bf_c^T: p_c @ A_c for all chunks at once, then one product with all Bf_c."""
    b, h, r, _ = p.shape
    c = values.chunk_len
    for seg in values.segments:
        nc, rank, d = seg.b.shape[2], seg.b.shape[-1], seg.b.shape[3]
        pc = p[..., seg.first_chunk * c:(seg.first_chunk + nc) * c].unsqueeze(-1)
        pa = (pc * seg.a.float().unsqueeze(2)).view(b, h, r, nc, c, rank).sum(-2)   # [B, H, R, nc, r]
        out += pa.reshape(b, h, r, nc * rank) @ seg.b.transpose(-1, -2).reshape(b, h, nc * rank, d).float()


def outlier_coordinates(store) -> tuple[torch.Tensor, torch.Tensor]:
    """Token (within the whole compressed region) and channel of every outlier: two int64 [B, H, n_chunks * k]."""
    pos = store.outlier_positions.long()
    d = _head_dim(store)
    b, h, n_chunks = pos.shape[:3]
    chunk_start = torch.arange(0, n_chunks * store.chunk_len, store.chunk_len, device=pos.device).view(-1, 1)
    if d & (d - 1) == 0:  # shifts and masks: integer division is a slow path on the CPU
        token, channel = (pos >> (d.bit_length() - 1)), pos & (d - 1)
    else:
        token, channel = pos // d, pos % d
    return (token + chunk_start).view(b, h, -1), channel.view(b, h, -1)


def compressed_attention_reference(query: torch.Tensor, keys, values, window_keys: torch.Tensor,
                                   window_values: torch.Tensor, mask: torch.Tensor | None = None,
                                   softmax_scale: float | None = None) -> torch.Tensor:
    """Attention of query [B, Hq, L, D] over (compressed past ++ window [B, H, W, D]); see the module docstring."""
    b, hq, l, d = query.shape
    h = window_keys.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q = _fold_queries(query, h) * scale  # scores are linear in q: scale the few query rows, not the N scores
    rows = q.shape[2]
    n = _num_tokens(keys)
    parts = []
    if n:
        block = _block_tokens(keys, values)
        blocks = [_key_scores_block(q, keys, n0, min(n, n0 + block)) for n0 in range(0, n, block)]
        past = blocks[0] if len(blocks) == 1 else torch.cat(blocks, -1)
        _lowrank_scores(q, keys, past)
        if keys.outlier_values is not None:
            t_idx, d_idx = outlier_coordinates(keys)
            qd = q.gather(-1, d_idx.unsqueeze(2).expand(b, h, rows, -1))
            past.scatter_add_(-1, t_idx.unsqueeze(2).expand(b, h, rows, -1),
                              qd * keys.outlier_values.reshape(b, h, 1, -1))
        parts.append(past)
    parts.append(q @ window_keys.float().transpose(-1, -2))
    scores = torch.cat(parts, -1)
    kv = scores.shape[-1]
    bias = attention_bias(mask, b, l, kv, q.device)
    scores = scores.view(b, h, hq // h, l, kv)
    if bias is not None:
        scores = scores + bias[:, None, None]
    p = scores.softmax(-1).view(b, h, rows, kv)
    out = p[..., n:] @ window_values.float()
    if n:
        pp = p[..., :n]
        for n0 in range(0, n, block):
            n1 = min(n, n0 + block)
            out += _value_mix_block(pp[..., n0:n1], values, n0, n1)
        _lowrank_mix(pp, values, out)
        if values.outlier_values is not None:
            t_idx, d_idx = outlier_coordinates(values)
            pt = pp.gather(-1, t_idx.unsqueeze(2).expand(b, h, rows, -1))
            out.scatter_add_(-1, d_idx.unsqueeze(2).expand(b, h, rows, -1),
                             pt * values.outlier_values.reshape(b, h, 1, -1))
    return out.view(b, hq, l, d).to(query.dtype)


def _block_tokens(keys, values) -> int:
    step = math.lcm(keys.chunk_len, keys.group_size)
    return max(step, REFERENCE_BLOCK_TOKENS // step * step)


# ------------------------------------------------------------------------------------------------- Triton kernel
if triton is not None:
    from .kv_quant import load_code_tile

    @triton.jit
    def _chunk_scores(q, q_rows_ptr, rows, row_mask, kc_ptr, ks_ptr, kz_ptr, ka_ptr, kb_ptr, kov_ptr, kop_ptr,
                      bh, c, N, CAP, k_lr_first, k_lr_chunks, k_rank, k_out,
                      D: tl.constexpr, C: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                      R_BLOCK: tl.constexpr, HAS_LR: tl.constexpr, O_BLOCK: tl.constexpr, HAS_OUT: tl.constexpr):
        """q [ROWS, D] . K_hat^T over chunk c: fused unpack + dequantize + dot, + low-rank + outliers. [ROWS, C]."""
        t = tl.arange(0, C)
        d = tl.arange(0, D)
        tok = c * C + t
        codes = load_code_tile(kc_ptr + bh * CAP * (D * BITS // 8), tok, tok < N, D, BITS).to(tl.float32)
        stat = (bh * (CAP // G) + tok // G)[:, None] * D + d[None, :]
        k_hat = codes * tl.load(ks_ptr + stat).to(tl.float32) + tl.load(kz_ptr + stat).to(tl.float32)
        s = tl.dot(q, tl.trans(k_hat), input_precision="ieee")
        if HAS_LR:  # (q @ Bf_c) @ A_c^T, masked off outside the low-rank run of chunks (rank padded to R_BLOCK)
            j = tl.arange(0, R_BLOCK)
            lc = tl.zeros([R_BLOCK], dtype=tl.int32) + (c - k_lr_first)  # a tensor, so the mask is one too
            rm = (j < k_rank) & (lc >= 0) & (lc < k_lr_chunks)
            bf = tl.load(kb_ptr + ((bh * k_lr_chunks + lc[None, :]) * D + d[:, None]) * k_rank + j[None, :],
                         mask=rm[None, :], other=0.0).to(tl.float32)                       # [D, R]
            a = tl.load(ka_ptr + (bh * k_lr_chunks * C + lc[None, :] * C + t[:, None]) * k_rank + j[None, :],
                        mask=rm[None, :], other=0.0).to(tl.float32)                        # [C, R]
            qb = tl.dot(q, bf, input_precision="ieee")                                      # [ROWS, R]
            s += tl.dot(qb, tl.trans(a), input_precision="ieee")
        if HAS_OUT:  # q[:, d_k] * s_k added at token t_k, as a product with a one-hot [K, C]
            k = tl.arange(0, O_BLOCK)
            km = k < k_out
            slot = (bh * (CAP // C) + c) * k_out + k
            pos = tl.load(kop_ptr + slot, mask=km, other=0).to(tl.int32)
            val = tl.load(kov_ptr + slot, mask=km, other=0.0).to(tl.float32)
            qd = tl.load(q_rows_ptr + rows[:, None] * D + (pos % D)[None, :], mask=row_mask[:, None] & km[None, :],
                         other=0.0)                                                         # [ROWS, K]
            onehot = ((pos // D)[:, None] == t[None, :]) & km[:, None]                      # [K, C]
            s += tl.dot(qd * val[None, :], onehot.to(tl.float32), input_precision="ieee")
        return s

    @triton.jit
    def _chunk_values(p, vc_ptr, vs_ptr, vz_ptr, va_ptr, vb_ptr, vov_ptr, vop_ptr, bh, c, N, CAP,
                      v_lr_first, v_lr_chunks, v_rank, v_out,
                      D: tl.constexpr, C: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                      R_BLOCK: tl.constexpr, HAS_LR: tl.constexpr, O_BLOCK: tl.constexpr, HAS_OUT: tl.constexpr):
        """p [ROWS, C] . V_hat over chunk c: fused unpack + dequantize + dot, + low-rank + outliers. [ROWS, D]."""
        t = tl.arange(0, C)
        d = tl.arange(0, D)
        tok = c * C + t
        codes = load_code_tile(vc_ptr + bh * CAP * (D * BITS // 8), tok, tok < N, D, BITS).to(tl.float32)
        stat = (bh * CAP + tok)[:, None] * (D // G) + (d // G)[None, :]
        v_hat = codes * tl.load(vs_ptr + stat).to(tl.float32) + tl.load(vz_ptr + stat).to(tl.float32)
        out = tl.dot(p, v_hat, input_precision="ieee")
        if HAS_LR:  # (p_c @ A_c) @ Bf_c^T
            j = tl.arange(0, R_BLOCK)
            lc = tl.zeros([R_BLOCK], dtype=tl.int32) + (c - v_lr_first)
            rm = (j < v_rank) & (lc >= 0) & (lc < v_lr_chunks)
            a = tl.load(va_ptr + (bh * v_lr_chunks * C + lc[None, :] * C + t[:, None]) * v_rank + j[None, :],
                        mask=rm[None, :], other=0.0).to(tl.float32)                        # [C, R]
            bf = tl.load(vb_ptr + ((bh * v_lr_chunks + lc[None, :]) * D + d[:, None]) * v_rank + j[None, :],
                         mask=rm[None, :], other=0.0).to(tl.float32)                       # [D, R]
            out += tl.dot(tl.dot(p, a, input_precision="ieee"), tl.trans(bf), input_precision="ieee")
        if HAS_OUT:  # p[:, t_k] * s_k added at channel d_k: two products with one-hot matrices
            k = tl.arange(0, O_BLOCK)
            km = k < v_out
            slot = (bh * (CAP // C) + c) * v_out + k
            pos = tl.load(vop_ptr + slot, mask=km, other=0).to(tl.int32)
            val = tl.load(vov_ptr + slot, mask=km, other=0.0).to(tl.float32)
            at_token = (t[:, None] == (pos // D)[None, :]) & km[None, :]                    # [C, K]
            p_k = tl.dot(p, at_token.to(tl.float32), input_precision="ieee")                # [ROWS, K]
            at_channel = ((pos % D)[:, None] == d[None, :]) & km[:, None]                   # [K, D]
            out += tl.dot(p_k * val[None, :], at_channel.to(tl.float32), input_precision="ieee")
        return out

    @triton.jit
    def _compressed_decode_kernel(
            q_ptr, acc_ptr, m_ptr, l_ptr, bias_ptr, wk_ptr, wv_ptr,
            kc_ptr, ks_ptr, kz_ptr, ka_ptr, kb_ptr, kov_ptr, kop_ptr,
            vc_ptr, vs_ptr, vz_ptr, va_ptr, vb_ptr, vov_ptr, vop_ptr,
            N, K_CAP, V_CAP, W, H, L, R, sm_scale, chunks_per_split,
            k_lr_first, k_lr_chunks, k_rank, k_out, v_lr_first, v_lr_chunks, v_rank, v_out,
            D: tl.constexpr, C: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr,
            RK_BLOCK: tl.constexpr, RV_BLOCK: tl.constexpr, HAS_KLR: tl.constexpr, HAS_VLR: tl.constexpr,
            OK_BLOCK: tl.constexpr, OV_BLOCK: tl.constexpr, HAS_KO: tl.constexpr, HAS_VO: tl.constexpr,
            HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
        """One program = ROWS query rows (the query heads of one KV head x steps, so the storage is read once for
        all of them) of one (b, KV head), over one split of the compressed chunks (the last split also takes the
        fp16 window): online softmax, writing its partial (max, sum, unnormalized output) for `_combine_splits`
        (flash-decoding: splits keep the GPU busy when batch x heads is small)."""
        bh = tl.program_id(0)
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        split = tl.program_id(2)
        n_splits = tl.num_programs(2)
        row_mask = rows < R
        d = tl.arange(0, D)
        q_rows_ptr = q_ptr + bh * R * D
        q = tl.load(q_rows_ptr + rows[:, None] * D + d[None, :], mask=row_mask[:, None], other=0.0)
        kv_len = N + W
        bias_rows = bias_ptr + ((bh // H) * L + rows % L) * kv_len                             # [ROWS]
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, D], dtype=tl.float32)
        t = tl.arange(0, C)
        n_chunks = N // C
        for i in range(0, chunks_per_split):
            c = split * chunks_per_split + i
            if c < n_chunks:
                s = _chunk_scores(q, q_rows_ptr, rows, row_mask, kc_ptr, ks_ptr, kz_ptr, ka_ptr, kb_ptr, kov_ptr,
                                  kop_ptr, bh, c, N, K_CAP, k_lr_first, k_lr_chunks, k_rank, k_out, D, C, GK, BITS,
                                  RK_BLOCK, HAS_KLR, OK_BLOCK, HAS_KO) * sm_scale
                if HAS_BIAS:
                    s += tl.load(bias_rows[:, None] + c * C + t[None, :], mask=row_mask[:, None], other=0.0)
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + _chunk_values(p, vc_ptr, vs_ptr, vz_ptr, va_ptr, vb_ptr, vov_ptr,
                                                           vop_ptr, bh, c, N, V_CAP, v_lr_first, v_lr_chunks, v_rank,
                                                           v_out, D, C, GV, BITS, RV_BLOCK, HAS_VLR, OV_BLOCK,
                                                           HAS_VO)
                m_i = m_new
        if split == n_splits - 1:
            w = tl.arange(0, BLOCK_W)
            for w0 in range(0, W, BLOCK_W):
                wm = w0 + w < W
                offs = (bh * W + w0 + w)[:, None] * D + d[None, :]
                k = tl.load(wk_ptr + offs, mask=wm[:, None], other=0.0).to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
                if HAS_BIAS:
                    s += tl.load(bias_rows[:, None] + N + w0 + w[None, :], mask=row_mask[:, None] & wm[None, :],
                                 other=0.0)
                s = tl.where(wm[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = tl.load(wv_ptr + offs, mask=wm[:, None], other=0.0).to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
                m_i = m_new
        part = (bh * R + rows) * n_splits + split                                             # [ROWS]
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=row_mask[:, None])
        tl.store(m_ptr + part, m_i, mask=row_mask)
        tl.store(l_ptr + part, l_i, mask=row_mask)


def _combine_splits(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Merge per-split softmax partials: acc [..., S, D], m and l [..., S] -> [..., D]. Empty splits (m = -inf,
    l = 0) weigh nothing."""
    weight = torch.exp(m - m.amax(-1, keepdim=True))
    return (acc * weight.unsqueeze(-1)).sum(-2) / (l * weight).sum(-1, keepdim=True)


def _dot_size(n: int) -> int:
    """A tile side for tl.dot: a power of two, at least 16."""
    return max(16, 1 << max(0, (n - 1).bit_length()))


def _single_segment(store):
    """(first_chunk, A, Bf, rank) as one run of chunks: segments of different ranks are zero-padded to the largest
    and merged (a copy of the small factors); None without low-rank."""
    segs = [s for s in store.segments if s.b.shape[2]]
    if not segs:
        return None
    if len(segs) == 1:
        s = segs[0]
        return s.first_chunk, s.a.contiguous(), s.b.contiguous(), s.b.shape[-1]
    rank = max(s.b.shape[-1] for s in segs)
    first, last = segs[0].first_chunk, segs[-1].first_chunk + segs[-1].b.shape[2]
    b, h, _, d, _ = segs[0].b.shape
    c = store.chunk_len
    a = segs[0].a.new_zeros(b, h, (last - first) * c, rank)
    bf = segs[0].b.new_zeros(b, h, last - first, d, rank)
    for s in segs:
        i, r = s.first_chunk - first, s.b.shape[-1]
        a[:, :, i * c:(i + s.b.shape[2]) * c, :r] = s.a
        bf[:, :, i:i + s.b.shape[2], :, :r] = s.b
    return first, a, bf, rank


def _triton_ok(keys, values, d: int) -> bool:
    if _num_tokens(keys) == 0:
        return d >= 16 and d & (d - 1) == 0
    c = keys.chunk_len
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    return (pow2(d) and d >= 16 and pow2(c) and c >= 16 and keys.bits == values.bits
            and values.group_size <= d and keys.chunk_len == values.chunk_len)


def _token_capacity(n: int, tensors) -> int | None:
    """The cache's store hands out prefix views (along tokens, key groups or chunks) of buffers that grow by doubling.
    The kernel reads them in place when each is such a view of a [B, H, cap_i, ...] buffer and all capacities agree
    in tokens: returns that token capacity (n for compact tensors), else None."""
    caps = set()
    for t in tensors:
        entries = t.shape[2]
        inner = t[0, 0].numel() // entries
        if not t[0, 0].is_contiguous() or t.stride(1) % inner or t.stride(0) != t.stride(1) * t.shape[1]:
            return None
        caps.add(t.stride(1) // inner * (n // entries))  # entries along axis 2 -> tokens
    return caps.pop() if len(caps) == 1 else None


def compressed_attention_triton(query, keys, values, window_keys, window_values, mask=None, softmax_scale=None,
                                splits: int | None = None):
    b, hq, l, d = query.shape
    h, w = window_keys.shape[1], window_keys.shape[2]
    q = _fold_queries(query, h).contiguous()
    rows = q.shape[2]
    n = _num_tokens(keys)
    if n + w == 0:
        raise ValueError("attention over an empty cache")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    bias = attention_bias(mask, b, l, n + w, q.device)
    dummy = q.new_zeros(1)
    wk, wv = window_keys.contiguous(), window_values.contiguous()
    if w == 0:
        wk = wv = dummy
    store_args, meta, caps = [], {}, {}
    for name, store in (("K", keys), ("V", values)):
        if n:
            lr = _single_segment(store)
            has_out = store.outlier_values is not None and store.outlier_values.shape[-1] > 0
            tensors = [store.codes, store.scale, store.zero] + ([store.outlier_values, store.outlier_positions]
                                                                if has_out else [])
            cap = _token_capacity(n, tensors)
            if cap is None:  # not prefix views of one growth schedule: read compact copies
                tensors, cap = [t.contiguous() for t in tensors], n
            caps[name] = cap
            store_args += tensors[:3] + [lr[1] if lr else dummy, lr[2] if lr else dummy]
            store_args += tensors[3:] if has_out else [dummy, dummy]
            meta[name] = (lr[0] if lr else 0, lr[2].shape[2] if lr else 0, lr[3] if lr else 1,
                          store.outlier_values.shape[-1] if has_out else 0, lr is not None, has_out)
        else:
            store_args += [dummy] * 7
            meta[name] = (0, 0, 1, 0, False, False)
            caps[name] = 0
    (klf, klc, kr, ko, has_klr, has_ko), (vlf, vlc, vr, vo, has_vlr, has_vo) = meta["K"], meta["V"]
    n_chunks = n // keys.chunk_len if n else 0
    row_blocks = triton.cdiv(rows, ROW_BLOCK)
    if splits is None:  # about two programs per SM, each with at least 4 chunks
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        splits = min(max(1, 2 * sms // (b * h * row_blocks)), max(1, n_chunks // 4))
    splits = max(1, min(splits, max(n_chunks, 1)))
    per_split = -(-n_chunks // splits)
    acc = q.new_empty(b * h, rows, splits, d)
    m, lse = q.new_empty(b * h, rows, splits), q.new_empty(b * h, rows, splits)
    _compressed_decode_kernel[(b * h, row_blocks, splits)](
        q, acc, m, lse, bias.contiguous() if bias is not None else dummy, wk, wv, *store_args,
        n, caps["K"], caps["V"], w, h, l, rows, scale, per_split, klf, klc, kr, ko, vlf, vlc, vr, vo,
        D=d, C=keys.chunk_len if n else 16, GK=keys.group_size if n else 1, GV=values.group_size if n else 1,
        BITS=keys.bits if n else 8, RK_BLOCK=_dot_size(kr), RV_BLOCK=_dot_size(vr), HAS_KLR=has_klr,
        HAS_VLR=has_vlr, OK_BLOCK=_dot_size(ko), OV_BLOCK=_dot_size(vo), HAS_KO=has_ko, HAS_VO=has_vo,
        HAS_BIAS=bias is not None, ROWS=ROW_BLOCK, BLOCK_W=32)
    return _combine_splits(acc, m, lse).view(b, hq, l, d).to(query.dtype)


# -------------------------------------------------------------------------------------------------- public API
def compressed_decode_attention(query: torch.Tensor, keys, values, window_keys: torch.Tensor,
                                window_values: torch.Tensor, mask: torch.Tensor | None = None,
                                softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q K^T * scale + mask) V over the compressed past (`keys`, `values`: stores in the shared format, or
    None / empty) followed by the fp16 window [B, H, W, D]. query [B, Hq, L, D] (L = 1 for a decode step; L > 1
    for a chunk of new tokens, which must then be in the window); mask: see `attention_bias`. Returns
    [B, Hq, L, D] in query's dtype. Triton on CUDA tensors, the torch reference elsewhere."""
    d = query.shape[-1]
    if use_triton(query, window_keys) and _triton_ok(keys, values, d):
        return compressed_attention_triton(query, keys, values, window_keys, window_values, mask, softmax_scale)
    return compressed_attention_reference(query, keys, values, window_keys, window_values, mask, softmax_scale)

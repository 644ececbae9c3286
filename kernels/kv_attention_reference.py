"""Torch reference of decode attention over the paged compressed KV storage (kv_pages.py) plus the fp16 window of
recent tokens: the CPU path, and what the Triton kernel (kv_attention_triton.py) is tested against. It never builds
a dense K or V of the past: per page, scores and the value mix are computed from codes and scales directly.

With scores for keys and p.V for values (GQA: the Hq = H * groups query heads are folded onto their KV head, so each
KV head's storage is read once for all its query heads), per page with basis U [D, r] and token factors A [T, r]:
  q.k_t  = sum_d (q_d * scale_gd) * code_td + sum_d q_d * zero_gd + (q @ U) . A_t + sum_{(t,d) in S} q_d * s_td
  p.V_d  = sum_t (p_t * scale_tg) * code_td + sum_t p_t * zero_tg + ((p @ A) @ U^T)_d + sum_{(t,d) in S} p_t s_td
then concatenated with the window's q.K_w^T, scaled, masked, softmaxed."""
from __future__ import annotations

import math

import torch

from .kv_pages import num_tokens, outlier_coordinates
from .kv_quant import code_lanes, unpack_codes

MASKED = torch.finfo(torch.float32).min  # finite, so a fully masked row (left padding) stays finite


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



def _key_scores_block(q: torch.Tensor, keys, page) -> torch.Tensor:
    """q [B, H, R, D] . K_hat^T over a page's tokens from codes and scales: [B, H, R, tokens].

    Works lane by lane (see `code_lanes`): lane j holds channels j::lanes, so no interleaved copy of the codes is
    made, each lane's uint8 codes are converted to float once, and the lanes accumulate in one baddbmm each, on
    top of the groups' q . zero."""
    b, h, r, d = q.shape
    g, t = keys.group_size, page.codes.shape[2]
    lanes = code_lanes(page.codes, keys.bits)
    stride, batch = len(lanes), b * h * (t // g)
    scale = page.scale.float()                                           # [B, H, T/G, D]
    zero = page.zero.float()
    # q_d * scale_gd, split by lane: [lanes, B*H*T/G, R, D/lanes]
    qs = (q.unsqueeze(2) * scale.unsqueeze(3)).view(batch, r, d // stride, stride).movedim(-1, 0).contiguous()
    s = (zero @ q.transpose(-1, -2)).view(batch, r, 1)                   # q . zero, once per group
    for j, lane in enumerate(lanes):
        s = torch.baddbmm(s, qs[j], lane.view(batch, g, d // stride).float().transpose(1, 2))  # [.., R, G]
    return s.view(b, h, t // g, r, g).permute(0, 1, 3, 2, 4).reshape(b, h, r, t)


def _value_mix_block(p: torch.Tensor, values, page) -> torch.Tensor:
    """p [B, H, R, tokens] . V_hat over a page's tokens: [B, H, R, D] (lane by lane, as above; each
    lane's product starts from the groups' p . zero)."""
    b, h, r, t = p.shape
    g = values.group_size
    lanes = code_lanes(page.codes, values.bits)
    stride = len(lanes)
    d = lanes[0].shape[-1] * stride
    ng = d // g
    scale = page.scale.float()                                          # [B, H, T, D/G]
    zero = page.zero.float()
    ps = p.unsqueeze(2) * scale.permute(0, 1, 3, 2).unsqueeze(3)          # [B, H, D/G, R, T]
    pz = (p @ zero).permute(0, 1, 3, 2).unsqueeze(-1)                    # [B, H, D/G, R, 1]: p . zero per group
    if g % stride:  # a group boundary inside a lane's channel run: interleave the codes (rare shapes)
        codes = unpack_codes(page.codes, values.bits).float()
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


def _page_scores(q: torch.Tensor, keys, page) -> torch.Tensor:
    """q [B, H, R, D] . K_hat^T over one page (codes, low-rank span, outliers): [B, H, R, tokens]."""
    s = _key_scores_block(q, keys, page)
    if page.a is not None:  # (q @ U) @ A^T: two small products, never A @ U^T
        s += (q @ page.basis.float()) @ page.a.float().transpose(-1, -2)
    if page.outlier_values is not None:
        b, h, rows, _ = q.shape
        tok, ch = outlier_coordinates(keys, page)
        qd = q.gather(-1, ch.unsqueeze(2).expand(b, h, rows, -1))
        s.scatter_add_(-1, tok.unsqueeze(2).expand(b, h, rows, -1), qd * page.outlier_values.reshape(b, h, 1, -1))
    return s


def _page_mix(p: torch.Tensor, values, page) -> torch.Tensor:
    """p [B, H, R, tokens] . V_hat over one page: [B, H, R, D]."""
    out = _value_mix_block(p, values, page)
    if page.a is not None:
        out += (p @ page.a.float()) @ page.basis.float().transpose(-1, -2)
    if page.outlier_values is not None:
        b, h, rows, _ = p.shape
        tok, ch = outlier_coordinates(values, page)
        pt = p.gather(-1, tok.unsqueeze(2).expand(b, h, rows, -1))
        out.scatter_add_(-1, ch.unsqueeze(2).expand(b, h, rows, -1), pt * page.outlier_values.reshape(b, h, 1, -1))
    return out


def compressed_attention_reference(query: torch.Tensor, keys, values, window_keys: torch.Tensor,
                                   window_values: torch.Tensor, mask: torch.Tensor | None = None,
                                   softmax_scale: float | None = None) -> torch.Tensor:
    """Attention of query [B, Hq, L, D] over (compressed past ++ window [B, H, W, D]); see the module docstring."""
    b, hq, l, d = query.shape
    h = window_keys.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q = _fold_queries(query, h) * scale  # scores are linear in q: scale the few query rows, not the N scores
    rows = q.shape[2]
    n = num_tokens(keys)
    parts = [_page_scores(q, keys, page) for page in keys.pages] if n else []
    parts.append(q @ window_keys.float().transpose(-1, -2))
    scores = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
    kv = scores.shape[-1]
    bias = attention_bias(mask, b, l, kv, q.device)
    scores = scores.view(b, h, hq // h, l, kv)
    if bias is not None:
        scores = scores + bias[:, None, None]
    p = scores.softmax(-1).view(b, h, rows, kv)
    out = p[..., n:] @ window_values.float()
    start = 0
    for page in (values.pages if n else []):
        t = page.codes.shape[2]
        out += _page_mix(p[..., start:start + t], values, page)
        start += t
    return out.view(b, hq, l, d).to(query.dtype)

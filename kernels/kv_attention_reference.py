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
from .kv_scale import scale_values
from .bitpack import unpack_lanes

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



def _split_lanes(x: torch.Tensor, stride: int) -> torch.Tensor:
    """[..., D] in channel order -> [S, ..., D/S] view in the lane order of `unpack_lanes` (lane j: channels j::S)."""
    return x.unflatten(-1, (-1, stride)).movedim(-1, 0)


def _key_scores_block(q: torch.Tensor, keys, page) -> torch.Tensor:
    """q [B, H, R, D] . K_hat^T over a page's tokens from codes and scales: [B, H, R, tokens].

    The codes are unpacked lane-outer (`unpack_lanes`: no interleaving copy), scaled in place per channel and group
    (keys: G tokens of a channel share a scale), multiplied by q split into the same lanes in one batched product,
    and the lanes' partial scores summed; q . zero is added once per group."""
    b, h, r, _ = q.shape
    g, t = keys.group_size, page.codes.shape[2]
    lanes = unpack_lanes(page.codes, keys.bits)                           # [S, B, H, T, D/S]
    stride = lanes.shape[0]
    scale = _split_lanes(scale_values(page.scale), stride).contiguous()
    lanes.view(stride, b, h, t // g, g, -1).mul_(scale.unsqueeze(4))
    q_lanes = _split_lanes(q, stride).reshape(stride * b * h, r, -1)
    s = torch.bmm(q_lanes, lanes.view(stride * b * h, t, -1).transpose(1, 2)).view(stride, b, h, r, t).sum(0)
    s.view(b, h, r, t // g, g).add_((q @ page.zero.float().transpose(-1, -2)).unsqueeze(-1))
    return s


def _value_mix_block(p: torch.Tensor, values, page) -> torch.Tensor:
    """p [B, H, R, tokens] . V_hat over a page's tokens: [B, H, R, D] (codes unpacked lane-outer as above; values:
    G channels of a token share a scale; p . zero added once per group)."""
    b, h, r, t = p.shape
    g = values.group_size
    lanes = unpack_lanes(page.codes, values.bits)                          # [S, B, H, T, D/S]
    stride = lanes.shape[0]
    d = stride * lanes.shape[-1]
    ng = d // g
    scale = scale_values(page.scale)                                       # [B, H, T, D/G]
    if ng == 1:  # one group per token: the scale folds into p
        ps = (p * scale.transpose(-1, -2)).view(1, b * h, r, t).expand(stride, -1, -1, -1).reshape(-1, r, t)
        out = torch.bmm(ps, lanes.view(stride * b * h, t, -1)).view(stride, b, h, r, -1)  # [S, B, H, R, D/S]
    else:
        if g % stride == 0:  # lane entry i is channel S*i + j, in group i // (G/S)
            lanes.view(stride, b, h, t, ng, g // stride).mul_(scale.view(1, b, h, t, ng, 1))
        else:  # a group boundary inside a lane's channel run (rare shapes): a per-channel scale
            lanes.mul_(_split_lanes(scale.repeat_interleave(g, -1), stride))
        out = p @ lanes
    out = out.movedim(0, -1).reshape(b, h, r, d)                           # back to channel order
    out.view(b, h, r, ng, g).add_((p @ page.zero.float()).unsqueeze(-1))
    return out


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
                                   softmax_scale: float | None = None, return_weights: bool = False):
    """Attention of query [B, Hq, L, D] over (compressed past ++ window [B, H, W, D]); see the module docstring.
    `return_weights`: (output, the softmax weights [B, Hq, L, past + W] in float32), for output_attentions."""
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
    out = out.view(b, hq, l, d).to(query.dtype)
    return (out, p.view(b, hq, l, kv)) if return_weights else out

"""Sliding-window softmax attention over [past window | new tokens], with per-key validity (left padding).

q [B, Hq, T, D]; keys/values [B, Hkv, P + T, D] where the first P entries are the cached past (oldest first) and
the last T are the new tokens; key_valid [B, P + T] (False: padding, or a cache slot never written). New token i
(at index P + i) attends to the keys at indices (P + i - window, P + i] that are valid. Grouped-query attention
without expanding K/V: the Hq / Hkv query heads of a group share their KV head.

`window_attention_reference` builds the dense [T, P + T] mask (ground truth, and the path for a few tokens);
`window_attention_blocked` cuts the new tokens into blocks of `window` queries that each see a 2 * window slice of
keys, so prefill costs O(T * window) instead of O(T * (P + T)). `sliding_window_attention` picks between them."""
from __future__ import annotations

import torch


def _grouped(q, hkv):
    b, hq, t, d = q.shape
    return q.view(b, hkv, hq // hkv, t, d)


def _softmax_attend(scores, visible, values):
    """softmax over the visible keys; a row that sees nothing (a padding query) gets zeros, not NaN."""
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1) * visible.any(-1, keepdim=True)
    return weights @ values


def window_attention_reference(q, keys, values, key_valid, window: int, scale: float):
    b, hq, t, _ = q.shape
    hkv, total = keys.shape[1], keys.shape[2]
    past = total - t
    qpos = torch.arange(t, device=q.device)[:, None] + past
    kpos = torch.arange(total, device=q.device)[None, :]
    visible = (kpos <= qpos) & (kpos > qpos - window)  # [T, P + T]
    visible = visible[None] & key_valid[:, None, :]  # [B, T, P + T]
    scores = (_grouped(q, hkv) @ keys.unsqueeze(2).transpose(-1, -2)) * scale  # [B, Hkv, G, T, P + T]
    out = _softmax_attend(scores, visible[:, None, None], values.unsqueeze(2))
    return out.reshape(b, hq, t, values.shape[-1])


def window_attention_blocked(q, keys, values, key_valid, window: int, scale: float):
    b, hq, t, d = q.shape
    hkv, total, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    past, w = total - t, window
    n = -(-t // w)
    # key index j sits at W + j in the extended sequence; block m's queries see the 2W slice from P + m*W
    left, right = w, n * w - t
    ext_k = torch.nn.functional.pad(keys, (0, 0, left, right))
    ext_v = torch.nn.functional.pad(values, (0, 0, left, right))
    ext_valid = torch.nn.functional.pad(key_valid, (left, right), value=False)
    k_blocks = ext_k[:, :, past:].unfold(2, 2 * w, w).transpose(-1, -2)  # [B, Hkv, n, 2W, D]
    v_blocks = ext_v[:, :, past:].unfold(2, 2 * w, w).transpose(-1, -2)
    valid_blocks = ext_valid[:, past:].unfold(1, 2 * w, w)  # [B, n, 2W]
    r = torch.arange(w, device=q.device)[:, None]
    c = torch.arange(2 * w, device=q.device)[None, :]
    band = (c > r) & (c <= r + w)  # query r of a block sees slice entries (r, r + W]
    visible = band[None, None] & valid_blocks[:, :, None, :]  # [B, n, W, 2W]
    # the G query heads of a KV head stacked along the block's rows: one [G*W, 2W] product per block, the keys not
    # repeated per query head; 4-D [B * Hkv, blocks, rows, D] so torch's fused attention takes it (5-D inputs fall
    # back to its unfused path, 1.5x slower). A padding row that sees nothing is given its own slot to see (no
    # fully masked row: some fused kernels return NaN there, and NaN would reach the gradients) and zeroed after.
    groups = hq // hkv
    qb = torch.nn.functional.pad(_grouped(q, hkv), (0, 0, 0, n * w - t)).view(b, hkv, groups, n, w, d)
    qb = qb.transpose(2, 3).reshape(b * hkv, n, groups * w, d)
    seen = visible.any(-1, keepdim=True)  # [B, n, W, 1]
    own = (c == r + w)[None, None]  # query r's own key sits at slice entry r + W
    rows = (visible | (own & ~seen))[:, None, :, None].expand(b, hkv, n, groups, w, 2 * w)
    rows = rows.reshape(b * hkv, n, groups * w, 2 * w)
    out = torch.nn.functional.scaled_dot_product_attention(qb, k_blocks.reshape(b * hkv, n, 2 * w, d),
                                                           v_blocks.reshape(b * hkv, n, 2 * w, dv), attn_mask=rows,
                                                           scale=scale)
    seen = seen[:, None, :, None].expand(b, hkv, n, groups, w, 1).reshape(b * hkv, n, groups * w, 1)
    out = torch.where(seen, out, 0.0)
    return out.view(b, hkv, n, groups, w, dv).transpose(2, 3).reshape(b, hq, n * w, dv)[:, :, :t]


def sliding_window_attention(q, keys, values, key_valid, window: int, scale: float):
    """Dense for up to `window` new tokens (decoding, short chunks), blocked beyond."""
    if q.shape[2] <= window:
        return window_attention_reference(q, keys, values, key_valid, window, scale)
    return window_attention_blocked(q, keys, values, key_valid, window, scale)

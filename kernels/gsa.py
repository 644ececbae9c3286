"""Gated slot attention (GSA; Liger's third gate): a bounded memory of M slots, written with the slot gates, read
with a softmax over the slots. Per KV head, with a_t = exp(g_t) in (0, 1]^M and s_t = 1 - a_t:

    K_t = K_{t-1} diag(a_t) + k_t^T s_t          [K, M]   (slot keys)
    V_t = diag(a_t) V_{t-1} + s_t^T v_t          [M, V]   (slot values)
    o_t = softmax(q_t K_t) V_t

Two passes of gated linear attention: the second is plain GLA (query softmax(q K), key s, value v, key-dimension
gates g: `compress.kernels.gla`); the first gates the *value* dimension (the slots), written here.

Layout: q [B, Hq, T, K], k [B, Hkv, T, K], v [B, Hkv, T, V], g [B, Hkv, T, M] (log slot gates, <= 0). The state is
packed in one tensor [B, Hkv, M, K + V] = [K_t^T | V_t] (one cache tensor per layer, like the other gates). A token
with k = v = 0 and g = 0 (padding) leaves it unchanged (s = 0).

`gsa_recurrent_reference` is the step-by-step ground truth; `gsa_chunked` the chunked torch path (training,
prefill); `gated_slot_attention` picks (one token: the recurrence)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gla import finite_log_gates, gla_chunked, torch_path_in_float32

DEFAULT_CHUNK = 32  # fastest measured on a CPU, forward and backward (BENCHMARKS.md)


def _unpack(state, q, k, v, m):
    b, hkv, dk, dv = k.shape[0], k.shape[1], k.shape[-1], v.shape[-1]
    if state is None:
        return q.new_zeros(b, hkv, dk, m), q.new_zeros(b, hkv, m, dv)
    state = state.to(q.dtype)
    return state[..., :dk].transpose(-1, -2), state[..., dk:]


def _pack(key_state, value_state):
    return torch.cat([key_state.transpose(-1, -2), value_state], dim=-1)


def gsa_recurrent_reference(q, k, v, g, initial_state=None):
    """(o [B, Hq, T, V], packed final state [B, Hkv, M, K + V]), one token at a time."""
    b, hq, t, dk = q.shape
    hkv, m = k.shape[1], g.shape[-1]
    key_state, value_state = _unpack(initial_state, q, k, v, m)
    qg = q.view(b, hkv, hq // hkv, t, dk)
    outs = []
    for i in range(t):
        a = g[:, :, i].exp()
        s = 1 - a
        key_state = key_state * a.unsqueeze(-2) + k[:, :, i].unsqueeze(-1) * s.unsqueeze(-2)
        value_state = value_state * a.unsqueeze(-1) + s.unsqueeze(-1) * v[:, :, i].unsqueeze(-2)
        p = (qg[:, :, :, i] @ key_state).softmax(-1)  # [b, h, G, M]
        outs.append(p @ value_state)
    o = torch.stack(outs, dim=3) if outs else q.new_zeros(b, hkv, hq // hkv, 0, v.shape[-1])
    return o.reshape(b, hq, t, v.shape[-1]), _pack(key_state, value_state)


def slot_scores_chunked(q, k, g, key_state, chunk_size: int):
    """Pass 1, (q_t K_t [B, Hq, T, M], final K [B, Hkv, K, M]): GLA whose gates act on the value dimension (slots).
    Inside a chunk score_i = sum_{j<=i} (q_i . k_j) s_j e^{b_i - b_j} (every exponent <= 0); across chunks the
    state entering the chunk is read as (q_i K_0) e^{b_i}."""
    b, hq, t, dk = q.shape
    hkv, m, c = k.shape[1], g.shape[-1], chunk_size
    g = finite_log_gates(g)
    n = -(-t // c)
    pad = n * c - t
    if pad:  # k = 0 and g = 0 (s = 0): nothing written past the end
        q, k, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, g))
    qc = q.view(b, hkv, hq // hkv, n, c, dk)
    kc, gc = k.view(b, hkv, n, c, dk), g.view(b, hkv, n, c, m)
    sc = 1 - gc.exp()
    cum = gc.cumsum(-2)
    lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    decay = (cum.unsqueeze(-2) - cum.unsqueeze(-3)).masked_fill(~lower[:, :, None], float("-inf")).exp()
    qk = torch.einsum("bhgnik,bhnjk->bhgnij", qc, kc)  # [b, h, G, n, i, j]
    scores = torch.einsum("bhgnij,bhnijm->bhgnim", qk, decay * sc.unsqueeze(-3))
    total = cum[:, :, :, -1]  # [b, h, n, M]
    local = torch.einsum("bhnjk,bhnjm->bhnkm", kc, sc * (total.unsqueeze(-2) - cum).exp())
    before = []
    for i in range(n):
        before.append(key_state)
        key_state = key_state * total[:, :, i].exp().unsqueeze(-2) + local[:, :, i]
    before = torch.stack(before, dim=2)  # [b, h, n, K, M]
    scores = scores + torch.einsum("bhgnik,bhnkm->bhgnim", qc, before) * cum.exp().unsqueeze(2)
    return scores.reshape(b, hq, n * c, m)[:, :, :t], key_state


def gsa_chunked(q, k, v, g, initial_state=None, chunk_size: int = DEFAULT_CHUNK):
    """(o, packed final state), equal to the recurrence."""
    m = g.shape[-1]
    key_state, value_state = _unpack(initial_state, q, k, v, m)
    if q.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), _pack(key_state, value_state)
    scores, key_state = slot_scores_chunked(q, k, g, key_state, chunk_size)
    o, value_state = gla_chunked(scores.softmax(-1), 1 - g.exp(), v, g, value_state, chunk_size)
    return o, _pack(key_state, value_state)


def gated_slot_attention(q, k, v, g, initial_state=None, chunk_size: int | None = None):
    """(o [B, Hq, T, V] in q's dtype, packed state [B, Hkv, M, K + V] in float32 or wider: see gla.py): the
    recurrence for one token, else the chunked path. (fla-core has chunk_gsa, but with equal head counts and its own
    state layout; not wired.)"""
    return torch_path_in_float32(gsa_recurrent_reference, gsa_chunked, q, k, v, g, initial_state=initial_state,
                                 chunk_size=chunk_size or DEFAULT_CHUNK)

"""Attention over the compressed storage, in torch: q.K^T and p.V computed from codes + scales, the low-rank factors
and the sparse outliers, never materializing the dense past K or V.

For keys (groups of G tokens per channel):  q.k_t = sum_d (q_d * scale_gd) * code_td + sum_d q_d * zero_gd
                                              + (q @ Bf_chunk) . A_t + sum_{outliers (t, d)} q_d * s_td
For values (groups of G channels per token): sum_t p_t v_td = sum_t (p_t * scale_tg) * code_td + sum_t p_t * zero_tg
                                              + ((p_chunk @ A_chunk) @ Bf_chunk^T)_d + sum_{outliers (t, d)} p_t * s_td
Codes are read as bit planes: plane j of a packed word holds the codes of channels d = i * per_word + j, so each
plane is a few scalar shifts of the packed bytes and the dot products run plane by plane (no interleaving copy)."""
from __future__ import annotations

import torch

from .kernel_api import unpack_codes
from .store import CompressedStore


def code_planes(packed: torch.Tensor, bits: int, dtype) -> list[torch.Tensor]:
    """uint8 [..., D*bits/8] -> per_word planes [..., D/per_word] in `dtype`; plane j holds channels i*per_word + j.
    2/4/8 bits: a word is one byte; 3 bits: a word is 3 bytes holding 8 codes (the shared packing)."""
    mask = (1 << bits) - 1
    if bits == 3:
        w = packed.view(*packed.shape[:-1], -1, 3).to(torch.int32)
        word = w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16)
        return [((word >> (3 * j)) & mask).to(dtype) for j in range(8)]
    per = 8 // bits
    return [((packed >> (bits * j)) if j == per - 1 else ((packed >> (bits * j)) & mask)).to(dtype)
            for j in range(per)]


def _per_word(bits: int) -> int:
    return 8 if bits == 3 else 8 // bits


def key_scores(q: torch.Tensor, keys: CompressedStore) -> torch.Tensor:
    """q [B, H, L, D] (float32) -> q.K_hat^T [B, H, L, N] over the compressed keys."""
    b, h, l, d = q.shape
    n, g, c = keys.num_tokens, keys.group_size, keys.chunk_len
    per = _per_word(keys.bits)
    scale, zero = keys.scale.to(q.dtype), keys.zero.to(q.dtype)          # [B, H, N/G, D]
    # q_d * scale_gd, split by plane: [per, B*H*N/G, L, D/per] (contiguous, so matmul runs as one bmm)
    qs = (q.unsqueeze(2) * scale.unsqueeze(3)).view(b * h * (n // g), l, d // per, per).movedim(-1, 0).contiguous()
    s = None
    for j, plane in enumerate(code_planes(keys.codes, keys.bits, q.dtype)):  # plane: [B, H, N, D/per]
        part = torch.bmm(qs[j], plane.view(b * h * (n // g), g, d // per).transpose(1, 2))  # [BHN/G, L, G]
        s = part if s is None else s + part
    s = s.view(b, h, n // g, l, g) + (zero @ q.transpose(-1, -2)).unsqueeze(-1)  # + q . zero per group
    s = s.permute(0, 1, 3, 2, 4).reshape(b, h, l, n)
    for seg in keys.segments:  # low-rank: (q @ Bf) @ A^T, chunk by chunk
        nc, r = seg.num_chunks, seg.b.shape[-1]
        qb = q.unsqueeze(2) @ seg.b.to(q.dtype)                           # [B, H, nc, L, r]
        a = seg.a.to(q.dtype).view(b, h, nc, c, r)
        lr = (qb @ a.transpose(-1, -2)).permute(0, 1, 3, 2, 4).reshape(b, h, l, nc * c)
        s[..., seg.first_chunk * c:(seg.first_chunk + nc) * c] += lr
    if keys.outlier_values is not None:
        t_idx, d_idx = _outlier_coordinates(keys)                         # [B, H, n_out]
        qd = q.gather(-1, d_idx.unsqueeze(2).expand(b, h, l, -1))         # q_d at each outlier
        contrib = qd * keys.outlier_values.reshape(b, h, 1, -1).to(q.dtype)
        s.scatter_add_(-1, t_idx.unsqueeze(2).expand(b, h, l, -1), contrib)
    return s


def value_mix(p: torch.Tensor, values: CompressedStore) -> torch.Tensor:
    """p [B, H, L, N] (attention weights over the compressed tokens) -> p.V_hat [B, H, L, D]."""
    b, h, l, n = p.shape
    g, c = values.group_size, values.chunk_len
    d = values.codes.shape[-1] * 8 // values.bits
    scale, zero = values.scale.to(p.dtype), values.zero.to(p.dtype)      # [B, H, N, D/G]
    ng, per = d // g, _per_word(values.bits)
    ps = p.unsqueeze(2) * scale.permute(0, 1, 3, 2).unsqueeze(3)          # [B, H, D/G, L, N]
    if g % per == 0:  # a word's channels share one group: work plane by plane
        ps = ps.reshape(b * h * ng, l, n) if ng == 1 else ps.reshape(b * h, ng, l, n)
        planes = []
        for pl in code_planes(values.codes, values.bits, p.dtype):     # [B, H, N, D/per]
            if ng == 1:
                planes.append(torch.bmm(ps, pl.view(b * h, n, d // per)).view(b, h, 1, l, g // per))
            else:
                planes.append((ps @ pl.view(b * h, n, ng, g // per).transpose(1, 2)).view(b, h, ng, l, g // per))
        out = torch.stack(planes, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, l, d)
    else:
        codes = unpack_codes(values.codes, values.bits).to(p.dtype).view(b, h, n, ng, g).transpose(2, 3)
        out = (ps @ codes).permute(0, 1, 3, 2, 4).reshape(b, h, l, d)   # sum_t p_t scale_tg code_td
    out = out + (p @ zero).repeat_interleave(g, dim=-1)                  # sum_t p_t zero_tg
    for seg in values.segments:
        nc, r = seg.num_chunks, seg.b.shape[-1]
        pc = p[..., seg.first_chunk * c:(seg.first_chunk + nc) * c].reshape(b, h, l, nc, c).transpose(2, 3)
        pa = pc @ seg.a.to(p.dtype).view(b, h, nc, c, r)                 # [B, H, nc, L, r]
        out = out + (pa @ seg.b.to(p.dtype).transpose(-1, -2)).sum(2)   # [B, H, L, D]
    if values.outlier_values is not None:
        t_idx, d_idx = _outlier_coordinates(values)
        pt = p.gather(-1, t_idx.unsqueeze(2).expand(b, h, l, -1))
        contrib = pt * values.outlier_values.reshape(b, h, 1, -1).to(p.dtype)
        out = out.scatter_add(-1, d_idx.unsqueeze(2).expand(b, h, l, -1), contrib)
    return out


def _outlier_coordinates(store: CompressedStore) -> tuple[torch.Tensor, torch.Tensor]:
    """Token index (within the whole compressed region) and channel of every outlier, [B, H, n_chunks * k]."""
    pos = store.outlier_positions.to(torch.int32)                         # [B, H, n_chunks, k], t*D + d in chunk
    d = store.codes.shape[-1] * 8 // store.bits
    chunk = torch.arange(pos.shape[2], device=pos.device, dtype=torch.int32).view(1, 1, -1, 1) * store.chunk_len
    b, h = pos.shape[:2]
    if d & (d - 1) == 0:  # power-of-two head_dim: shifts are much cheaper than integer division on CPU
        shift = d.bit_length() - 1
        t, dd = pos >> shift, pos & (d - 1)
    else:
        t, dd = pos // d, pos % d
    return (t + chunk).reshape(b, h, -1).long(), dd.reshape(b, h, -1).long()


def attend(query: torch.Tensor, past_keys: CompressedStore, past_values: CompressedStore,
           recent_keys: torch.Tensor, recent_values: torch.Tensor, mask: torch.Tensor | None,
           scaling: float) -> torch.Tensor:
    """Softmax attention of query [B, Hq, L, D] over (compressed past ++ recent fp window and new tokens).

    GQA: the Hq = H * groups query heads are folded onto their KV head. `mask` is transformers' 4D mask over all
    N + W keys (bool, True = attend; or additive float), or None for plain causal attention."""
    b, hq, l, d = query.shape
    h = recent_keys.shape[1]
    groups = hq // h
    q = query.float().reshape(b, h, groups * l, d)
    n = past_keys.num_tokens
    scores = torch.cat([key_scores(q, past_keys), q @ recent_keys.float().transpose(-1, -2)], dim=-1) * scaling
    kv = scores.shape[-1]
    scores = scores.view(b, h, groups, l, kv)
    neg = torch.finfo(scores.dtype).min  # not -inf: a fully masked row (left padding) stays finite
    if mask is None:
        if l > 1:  # causal: query i sits at position kv - l + i
            pos_q = torch.arange(kv - l, kv, device=q.device).view(-1, 1)
            scores = scores.masked_fill(torch.arange(kv, device=q.device).view(1, -1) > pos_q, neg)
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[:, :, None, :, -kv:], neg)
    else:
        scores = scores + mask[:, :, None, :, -kv:].float()
    p = scores.softmax(-1).view(b, h, groups * l, kv)
    out = value_mix(p[..., :n].contiguous(), past_values) + p[..., n:] @ recent_values.float()
    return out.view(b, hq, l, d).to(query.dtype)

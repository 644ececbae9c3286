"""Gated delta rule (Gated DeltaNet; the memory of each MoM memory), one scalar decay and write strength per head:

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = q_t S_t,   alpha_t = exp(g_t)

Layout: q [B, Hq, T, K], k [B, Hkv, T, K] (unit-norm rows keep the update contractive), v [B, Hkv, T, V],
g (log-decay, <= 0) and beta (in [0, 1]) [B, Hkv, T], state [B, Hkv, K, V]. With grouped-query attention the
state lives per KV head and the Hq / Hkv query heads of a group read it (nothing expanded). A token with k = 0,
g = 0 and beta = 0 leaves the state unchanged (padding, a memory the token is not routed to).

- `delta_rule_recurrent_reference`: one token at a time (ground truth; tests run it in float64);
- `delta_rule_chunked`: chunks of `chunk_size` tokens in the WY/UT form (below), the state carried across chunks;
  differentiable, the CPU path (training and prefill);
- fla-core's `chunk_gated_delta_rule` on CUDA when the optional `fla` extra is installed (imported lazily).
`gated_delta_rule` picks one (COMPRESS_KERNELS=torch forces the torch path).

Chunk form. With S_0 the state entering a chunk and b_i the within-chunk cumulative log-decay, every state inside
the chunk is S_i = e^{b_i} S_0 + sum_{j<=i} e^{b_i - b_j} k_j u_j^T, where the pseudo-values u solve the unit
lower-triangular system (I + A) u = diag(beta) (V - diag(e^b) K S_0), A_ij = beta_i e^{b_i - b_j} k_i.k_j (j < i).
So u = U_v - W S_0 with U_v = (I + A)^-1 diag(beta) V and W = (I + A)^-1 diag(beta e^b) K, both computed for all
chunks at once; only the S_0-dependent part runs chunk after chunk. Every exponent is <= 0: nothing overflows."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gla import _use_fla, finite_log_gates, torch_path_in_float32

DEFAULT_CHUNK = 32  # fastest measured on a CPU for MoM's memories (BENCHMARKS.md)


def _check(q, k, v, g, beta):
    if (k.shape[:3] != v.shape[:3] or g.shape != k.shape[:3] or beta.shape != g.shape or q.shape[0] != k.shape[0]
            or q.shape[2:] != k.shape[2:]):
        raise ValueError(f"delta rule shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"g {tuple(g.shape)}, beta {tuple(beta.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")


def delta_rule_recurrent_reference(q, k, v, g, beta, initial_state=None):
    """(o [B, Hq, T, V], final state [B, Hkv, K, V]) by the plain recurrence, one token at a time."""
    _check(q, k, v, g, beta)
    b, hq, t, dk = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    state = q.new_zeros(b, hkv, dk, dv) if initial_state is None else initial_state.to(q.dtype)
    qg = q.view(b, hkv, hq // hkv, t, dk)
    outs = []
    for i in range(t):
        k_i = k[:, :, i]
        decayed = g[:, :, i].exp()[..., None, None] * state
        predicted = torch.einsum("bhk,bhkv->bhv", k_i, decayed)  # what the memory holds for k_i now
        correction = beta[:, :, i, None] * (v[:, :, i] - predicted)
        state = decayed + k_i.unsqueeze(-1) * correction.unsqueeze(-2)
        outs.append(torch.einsum("bhgk,bhkv->bhgv", qg[:, :, :, i], state))
    o = torch.stack(outs, dim=3) if outs else q.new_zeros(b, hkv, hq // hkv, 0, dv)
    return o.reshape(b, hq, t, dv), state


def delta_rule_chunked(q, k, v, g, beta, initial_state=None, chunk_size: int = DEFAULT_CHUNK):
    """(o, final state), equal to the recurrence (module docstring: the chunk form)."""
    _check(q, k, v, g, beta)
    b, hq, t, dk = q.shape
    hkv, dv, c = k.shape[1], v.shape[-1], chunk_size
    groups = hq // hkv
    state = q.new_zeros(b, hkv, dk, dv) if initial_state is None else initial_state.to(q.dtype)
    if t == 0:
        return q.new_zeros(b, hq, 0, dv), state
    g = finite_log_gates(g)
    n = -(-t // c)
    pad = n * c - t
    if pad:  # k = g = beta = 0 past the end: identity steps, outputs and final state unchanged
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    qc = q.view(b, hkv, groups, n, c, dk)
    kc, vc = k.view(b, hkv, n, c, dk), v.view(b, hkv, n, c, dv)
    betac = beta.view(b, hkv, n, c)
    cum = g.view(b, hkv, n, c).cumsum(-1)  # b_i
    diff = cum.unsqueeze(-1) - cum.unsqueeze(-2)  # b_i - b_j  [b, h, n, i, j]
    lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    strict = lower.clone().fill_diagonal_(False)
    decay_strict = diff.masked_fill(~strict, float("-inf")).exp()
    decay_lower = diff.masked_fill(~lower, float("-inf")).exp()

    # WY/UT: (I + A)^-1 applied to beta V and to beta e^b K, all chunks at once
    a = betac.unsqueeze(-1) * (kc @ kc.transpose(-1, -2)) * decay_strict
    system = a + torch.eye(c, dtype=a.dtype, device=a.device)
    u_v = torch.linalg.solve_triangular(system, betac.unsqueeze(-1) * vc, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, (betac * cum.exp()).unsqueeze(-1) * kc, upper=False,
                                      unitriangular=True)
    scores = torch.einsum("bhgnik,bhnjk->bhgnij", qc, kc) * decay_lower.unsqueeze(2)  # q_i.k_j e^{b_i - b_j}
    q_decayed = qc * cum.exp().unsqueeze(2).unsqueeze(-1)  # e^{b_i} q_i: reads S_0
    total = cum[..., -1]  # [b, h, n]
    k_to_end = kc * (total.unsqueeze(-1) - cum).exp().unsqueeze(-1)  # e^{b_C - b_j} k_j: writes the next state

    # only the state runs chunk after chunk; every chunk's output is then read from the state entering it at once
    befores, us = [], []
    for i in range(n):
        u = u_v[:, :, i] - w[:, :, i] @ state  # [b, h, C, V]
        befores.append(state)
        us.append(u)
        state = total[:, :, i].exp()[..., None, None] * state + k_to_end[:, :, i].transpose(-1, -2) @ u
    before, u = torch.stack(befores, dim=2), torch.stack(us, dim=2)  # [b, h, n, K, V], [b, h, n, C, V]

    def rows(x):  # [b, h, g, n, C, .] -> [b, h, n, g * C, .]: the group's queries as rows, nothing broadcast
        return x.transpose(2, 3).reshape(b, hkv, n, groups * c, x.shape[-1])

    o = (rows(q_decayed) @ before + rows(scores) @ u).view(b, hkv, n, groups, c, dv).transpose(2, 3)
    return o.reshape(b, hq, n * c, dv)[:, :, :t], state


def delta_rule_fla(q, k, v, g, beta, initial_state=None):
    """fla-core's chunk_gated_delta_rule (CUDA). fla wants equal head counts, so K/V/gates and the state are
    expanded per query head here (the heads of a group carry identical states; the KV head's is read back from the
    first). Not exercised by the CPU tests."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    groups = q.shape[1] // k.shape[1]

    def heads(x):  # [B, H, T, ...] -> [B, T, Hq, ...]
        return (x.repeat_interleave(groups, dim=1) if groups > 1 else x).transpose(1, 2)

    init = initial_state
    if init is not None and groups > 1:
        init = init.repeat_interleave(groups, dim=1)
    gates = heads(finite_log_gates(g.float()))
    o, final = chunk_gated_delta_rule(q.transpose(1, 2), heads(k), heads(v), gates, heads(beta),
                                      scale=1.0, initial_state=None if init is None else init.float(),
                                      output_final_state=True)
    return o.transpose(1, 2), final[:, ::groups]  # fla's final state is float32


def gated_delta_rule(q, k, v, g, beta, initial_state=None, chunk_size: int | None = None):
    """(o [B, Hq, T, V] in q's dtype, final state [B, Hkv, K, V] in float32 or wider: see gla.py). One token: the
    recurrence step; CUDA with fla-core: chunk_gated_delta_rule; elsewhere the chunked torch path."""
    if q.shape[2] > 1 and _use_fla(q):
        return delta_rule_fla(q, k, v, g, beta, initial_state)
    return torch_path_in_float32(delta_rule_recurrent_reference, delta_rule_chunked, q, k, v, g, beta,
                                 initial_state=initial_state, chunk_size=chunk_size or DEFAULT_CHUNK)

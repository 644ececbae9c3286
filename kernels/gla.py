"""Gated linear attention (GLA, key-dimension gates): S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = q_t S_t.

Layout: q [B, Hq, T, K], k and g (log-gates, <= 0) [B, Hkv, T, K], v [B, Hkv, T, V], state [B, Hkv, K, V].
With grouped-query attention (Hq = G * Hkv) the state lives per KV head: the G query heads of a group read the same
state, so neither K/V nor the state is expanded per query head.

Three implementations, one contract:
- `gla_recurrent_reference`: the step-by-step recurrence (ground truth; tests run it in float64);
- `gla_chunked`: chunks of `chunk_size` tokens, exact pairwise decay inside a chunk and the state carried across
  chunks; differentiable, the CPU path (training and prefill);
- fla-core's `chunk_gla` on CUDA when the optional `fla` extra is installed (imported lazily).
`gated_linear_attention` picks one (COMPRESS_KERNELS=torch forces the torch path, as for every kernel here).

Precision: the dispatchers here and in gsa.py / delta_rule.py return the state in float32 whatever the inputs' dtype
(as fla does): a state summed over thousands of tokens in bf16 drifts, and the fused CPU decode steps read float32.
The torch paths then compute in float32 and return outputs in the inputs' dtype."""
from __future__ import annotations

import functools

import torch

from ..environment import setting

DEFAULT_CHUNK = 16


def _check(q, k, v, g):
    if k.shape != g.shape or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"GLA shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")


def gla_recurrent_reference(q, k, v, g, initial_state=None):
    """(o [B, Hq, T, V], final state [B, Hkv, K, V]) by the plain recurrence, one token at a time."""
    _check(q, k, v, g)
    b, hq, t, dk = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    state = q.new_zeros(b, hkv, dk, dv) if initial_state is None else initial_state.to(q.dtype)
    qg = q.view(b, hkv, hq // hkv, t, dk)
    outs = []
    for i in range(t):
        state = g[:, :, i].exp().unsqueeze(-1) * state + k[:, :, i].unsqueeze(-1) * v[:, :, i].unsqueeze(-2)
        outs.append(torch.einsum("bhgk,bhkv->bhgv", qg[:, :, :, i], state))
    o = torch.stack(outs, dim=3) if outs else q.new_zeros(b, hkv, hq // hkv, 0, dv)
    return o.reshape(b, hq, t, dv), state


def gla_step(q, k, v, g, state):
    """One decoding step (T == 1) from `state` (None: zeros): the recurrence itself, cheapest for a single token."""
    return gla_recurrent_reference(q, k, v, g, state)


def gla_chunked(q, k, v, g, initial_state=None, chunk_size: int = DEFAULT_CHUNK):
    """(o, final state), equal to the recurrence. Inside a chunk the decay between positions i >= j is
    exp(b_i - b_j) with b the within-chunk cumulative log-gate: every exponent is <= 0, so nothing overflows however
    strong the gates are (the factorized q*exp(b) @ (k*exp(-b))^T form overflows for strong gates)."""
    _check(q, k, v, g)
    b, hq, t, dk = q.shape
    hkv, dv, c = k.shape[1], v.shape[-1], chunk_size
    groups = hq // hkv
    state = q.new_zeros(b, hkv, dk, dv) if initial_state is None else initial_state.to(q.dtype)
    if t == 0:
        return q.new_zeros(b, hq, 0, dv), state
    n = -(-t // c)
    pad = n * c - t
    if pad:  # zero keys/values and zero log-gates (no decay) past the end leave outputs and final state unchanged
        q, k, v, g = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    qc = q.view(b, hkv, groups, n, c, dk)
    kc, gc, vc = k.view(b, hkv, n, c, dk), g.view(b, hkv, n, c, dk), v.view(b, hkv, n, c, dv)
    cum = gc.cumsum(dim=-2)  # b_i within each chunk

    # intra-chunk: A[i, j] = sum_d q_id k_jd exp(b_id - b_jd), j <= i
    diff = cum.unsqueeze(-2) - cum.unsqueeze(-3)  # [b, h, n, i, j, K]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    decay = diff.masked_fill(~causal[:, :, None], float("-inf")).exp()
    scores = torch.einsum("bhgnik,bhnijk->bhgnij", qc, kc.unsqueeze(-3) * decay)
    o = torch.einsum("bhgnij,bhnjv->bhgniv", scores, vc)

    # inter-chunk: each chunk's own contribution to the state, then a scan over chunks
    total = cum[:, :, :, -1]  # [b, h, n, K]
    local = torch.einsum("bhnjk,bhnjv->bhnkv", kc * (total.unsqueeze(-2) - cum).exp(), vc)
    before = []
    for i in range(n):
        before.append(state)
        state = total[:, :, i].exp().unsqueeze(-1) * state + local[:, :, i]
    before = torch.stack(before, dim=2)  # state entering each chunk [b, h, n, K, V]
    o = o + torch.einsum("bhgnik,bhnkv->bhgniv", qc * cum.exp().unsqueeze(2), before)
    return o.reshape(b, hq, n * c, dv)[:, :, :t], state


@functools.lru_cache(maxsize=1)
def fla_available() -> bool:
    try:
        import fla.ops.gla  # noqa: F401
    except ImportError:
        return False
    return True


def _use_fla(*tensors) -> bool:
    forced = setting("COMPRESS_KERNELS")
    if forced == "torch":
        return False
    return all(t.is_cuda for t in tensors) and fla_available()


def gla_fla(q, k, v, g, initial_state=None):
    """fla-core's chunk_gla (CUDA). fla wants equal head counts, so K/V/gates and the state are expanded per query
    head here (the heads of a group carry identical states; the per-KV-head state is read back from the first)."""
    from fla.ops.gla import chunk_gla

    b, hq, t, dk = q.shape
    groups = hq // k.shape[1]

    def heads(x):  # [B, H, T, D] -> [B, T, Hq, D]
        return x.repeat_interleave(groups, dim=1).transpose(1, 2) if groups > 1 else x.transpose(1, 2)

    init = initial_state.repeat_interleave(groups, dim=1) if initial_state is not None and groups > 1 else initial_state
    o, final = chunk_gla(q.transpose(1, 2), heads(k), heads(v), heads(g), scale=1.0,
                         initial_state=None if init is None else init.float(), output_final_state=True)
    return o.transpose(1, 2), final[:, ::groups]  # fla's final state is float32


def upcast_half(*tensors):
    """float16/bf16 tensors as float32; others (float32, the tests' float64) unchanged."""
    return tuple(x.float() if x is not None and x.dtype in (torch.float16, torch.bfloat16) else x for x in tensors)


def torch_path_in_float32(step, chunked, *inputs, initial_state=None, chunk_size: int = DEFAULT_CHUNK):
    """A torch recurrence (`step` for one token, else `chunked`) computed in float32 for half-precision inputs:
    (o in the inputs' dtype, state in float32 or wider)."""
    dtype = inputs[0].dtype
    *inputs, initial_state = upcast_half(*inputs, initial_state)
    if inputs[0].shape[2] == 1:
        o, state = step(*inputs, initial_state)
    else:
        o, state = chunked(*inputs, initial_state, chunk_size)
    return o.to(dtype), state


def gated_linear_attention(q, k, v, g, initial_state=None, chunk_size: int = DEFAULT_CHUNK):
    """(o [B, Hq, T, V] in q's dtype, final state [B, Hkv, K, V] in float32 or wider). One token: the recurrence
    step; CUDA with fla-core: chunk_gla; elsewhere the chunked torch path."""
    if q.shape[2] > 1 and _use_fla(q):
        return gla_fla(q, k, v, g, initial_state)
    return torch_path_in_float32(gla_step, gla_chunked, q, k, v, g, initial_state=initial_state,
                                 chunk_size=chunk_size)

"""Gated linear attention (GLA, key-dimension gates): S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = q_t S_t.

Layout: q [B, Hq, T, K], k and g (log-gates, <= 0) [B, Hkv, T, K], v [B, Hkv, T, V], state [B, Hkv, K, V].
With grouped-query attention (Hq = G * Hkv) the state lives per KV head: the G query heads of a group read the same
state, so neither K/V nor the state is expanded per query head.

Three implementations, one contract:
- `gla_recurrent_reference`: the step-by-step recurrence (ground truth; tests run it in float64);
- `gla_chunked`: chunks of `chunk_size` tokens, two matmuls inside a chunk (the pairwise decay form for key
  dimensions whose gates would overflow them) and the state carried across chunks; differentiable, the CPU path
  (training and prefill);
- fla-core's `chunk_gla` on CUDA when the optional `fla` extra is installed (imported lazily).
`gated_linear_attention` picks one (COMPRESS_KERNELS=torch forces the torch path, as for every kernel here).

Precision: the dispatchers here and in gsa.py / delta_rule.py return the state in float32 whatever the inputs' dtype
(as fla does): a state summed over thousands of tokens in bf16 drifts, and the fused CPU decode steps read float32.
The torch paths then compute in float32 and return outputs in the inputs' dtype."""
from __future__ import annotations

import functools
import math

import torch

from ..environment import setting

DEFAULT_CHUNK = 64  # fastest measured on a CPU, forward and backward (BENCHMARKS.md)
# The factorized chunk form is used for key dimensions whose log-gates sum to no less than this over a chunk
# (e^40 ~ 2e17: far from float32's overflow); stronger gates take the pairwise form in chunks of PAIRWISE_CHUNK.
SAFE_CHUNK_DECAY = 40.0
PAIRWISE_CHUNK = 8


def finite_log_gates(g):
    """Log-gates floored at 2 log(eps) of their dtype. A gate below that forgets the state to within eps^2 of what the
    dtype can hold, so the floor changes nothing it could represent; an unfloored -inf (an overflowing projection)
    would turn the chunk forms' differences of cumulative log-gates into -inf - -inf = NaN."""
    return g.clamp(min=2 * math.log(torch.finfo(g.dtype).eps))


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
    """(o, final state), equal to the recurrence. The key dimensions are independent recurrences (the gates are
    diagonal), so they split: those whose log-gates sum to more than -SAFE_CHUNK_DECAY over every chunk take the
    factorized form (two matmuls per chunk), the rest (a gate that forgets nearly everything within a chunk) the
    pairwise form, whose exponents are all <= 0 whatever the gates."""
    _check(q, k, v, g)
    b, hq, t, dk = q.shape
    state = q.new_zeros(b, k.shape[1], dk, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    if t == 0:
        return q.new_zeros(b, hq, 0, v.shape[-1]), state
    g = finite_log_gates(g)
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    if pad:  # zero keys/values and zero log-gates (no decay) past the end leave outputs and final state unchanged
        q, k, v, g = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    chunk_decay = g.detach().view(*g.shape[:2], n, chunk_size, dk).sum(-2)  # [b, h, n, K]
    # (a half-precision caller's e^{-b} overflows far sooner: the limit shrinks with the dtype's range)
    limit = min(SAFE_CHUNK_DECAY, math.log(torch.finfo(g.dtype).max) / 2)
    strong = (chunk_decay < -limit).flatten(0, -2).any(0)  # [K]
    if not strong.any():
        o, state = _gla_factorized(q, k, v, g, state, chunk_size)
    elif strong.all():
        o, state = _gla_pairwise(q, k, v, g, state, min(chunk_size, PAIRWISE_CHUNK))
    else:  # each part with its key dimensions only; the state's rows put back in order
        weak, strong = (~strong).nonzero().squeeze(1), strong.nonzero().squeeze(1)
        o_weak, s_weak = _gla_factorized(q[..., weak], k[..., weak], v, g[..., weak], state[..., weak, :],
                                         chunk_size)
        o_strong, s_strong = _gla_pairwise(q[..., strong], k[..., strong], v, g[..., strong], state[..., strong, :],
                                           min(chunk_size, PAIRWISE_CHUNK))
        o = o_weak + o_strong
        state = torch.cat([s_weak, s_strong], dim=-2)[..., torch.cat([weak, strong]).argsort(), :]
    return o[:, :, :t], state


def _gla_factorized(q, k, v, g, state, c: int):
    """T a multiple of c. Inside a chunk, with b the cumulative log-gate from the chunk's start (<= 0):
    A[i, j] = (q_i e^{b_i}) . (k_j e^{-b_j}) for j <= i; e^{-b_j} <= e^{SAFE_CHUNK_DECAY} stays finite, and rounding
    is relative, so the large factors cost no precision. The state enters each chunk through q_i e^{b_i}."""
    b, hq, t, dk = q.shape
    hkv, dv, n, groups = k.shape[1], v.shape[-1], t // c, hq // k.shape[1]
    kc, gc, vc = k.view(b, hkv, n, c, dk), g.view(b, hkv, n, c, dk), v.view(b, hkv, n, c, dv)
    cum = gc.cumsum(dim=-2)
    total = cum[:, :, :, -1:]  # [b, h, n, 1, K]
    # the G query heads of a KV head as rows of one matrix per chunk [G * c, K]: nothing broadcast (copied) per head
    q_decayed = (q.view(b, hkv, groups, n, c, dk).transpose(2, 3) * cum.exp().unsqueeze(3)).reshape(
        b, hkv, n, groups * c, dk)
    scores = q_decayed @ (kc * (-cum).exp()).transpose(-1, -2)  # [b, h, n, G * i, j]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril().repeat(groups, 1)
    local = (kc * (total - cum).exp()).transpose(-1, -2) @ vc  # each chunk's own contribution to the state
    before, state = _scan_chunks(state, total.squeeze(-2), local)
    o = scores.masked_fill(~causal, 0.0) @ vc + q_decayed @ before
    return o.view(b, hkv, n, groups, c, dv).transpose(2, 3).reshape(b, hq, t, dv), state


def _gla_pairwise(q, k, v, g, state, c: int):
    """T a multiple of c. Inside a chunk the decay between positions i >= j is exp(b_i - b_j): every exponent is
    <= 0, so nothing overflows however strong the gates are; the [c, c, K] decay tensor makes it the slower form."""
    b, hq, t, dk = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    n = -(-t // c)
    if n * c > t:  # (padding as in gla_chunked)
        q, k, v, g = (torch.nn.functional.pad(x, (0, 0, 0, n * c - t)) for x in (q, k, v, g))
    qc = q.view(b, hkv, hq // hkv, n, c, dk)
    kc, gc, vc = k.view(b, hkv, n, c, dk), g.view(b, hkv, n, c, dk), v.view(b, hkv, n, c, dv)
    cum = gc.cumsum(dim=-2)  # b_i within each chunk
    diff = cum.unsqueeze(-2) - cum.unsqueeze(-3)  # [b, h, n, i, j, K]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    decay = diff.masked_fill(~causal[:, :, None], float("-inf")).exp()
    scores = torch.einsum("bhgnik,bhnijk->bhgnij", qc, kc.unsqueeze(-3) * decay)
    o = torch.einsum("bhgnij,bhnjv->bhgniv", scores, vc)
    total = cum[:, :, :, -1]  # [b, h, n, K]
    local = torch.einsum("bhnjk,bhnjv->bhnkv", kc * (total.unsqueeze(-2) - cum).exp(), vc)
    before, state = _scan_chunks(state, total, local)
    o = o + torch.einsum("bhgnik,bhnkv->bhgniv", qc * cum.exp().unsqueeze(2), before)
    return o.reshape(b, hq, n * c, dv)[:, :, :t], state


def _scan_chunks(state, total, local):
    """(the state entering each chunk [b, h, n, K, V], the final state): S <- diag(e^{total_n}) S + local_n."""
    before = []
    for i in range(total.shape[2]):
        before.append(state)
        state = total[:, :, i].exp().unsqueeze(-1) * state + local[:, :, i]
    return torch.stack(before, dim=2), state


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
    o, final = chunk_gla(q.transpose(1, 2), heads(k), heads(v), heads(finite_log_gates(g)), scale=1.0,
                         initial_state=None if init is None else init.float(), output_final_state=True)
    return o.transpose(1, 2), final[:, ::groups]  # fla's final state is float32


def upcast_half(*tensors):
    """float16/bf16 tensors as float32; others (float32, the tests' float64) unchanged."""
    return tuple(x.float() if x is not None and x.dtype in (torch.float16, torch.bfloat16) else x for x in tensors)


# tokens per chunked call where no gradient is wanted (a prompt): a 32k prompt in one call held every chunk's
# float32 states at once, 2x the dense model's peak memory; segments carry the state across, the same recurrence
PROMPT_SEGMENT = 2048


def torch_path_in_float32(step, chunked, *inputs, initial_state=None, chunk_size: int):
    """A torch recurrence (`step` for one token, else `chunked`) computed in float32 for half-precision inputs:
    (o in the inputs' dtype, state in float32 or wider). Inputs [B, H, T, ...] without gradients go in segments of
    PROMPT_SEGMENT tokens."""
    t = inputs[0].shape[2]
    if t > PROMPT_SEGMENT and not (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)):
        outs, state = [], initial_state
        for start in range(0, t, PROMPT_SEGMENT):
            segment = [x[:, :, start:start + PROMPT_SEGMENT] for x in inputs]
            o, state = torch_path_in_float32(step, chunked, *segment, initial_state=state, chunk_size=chunk_size)
            outs.append(o)
        return torch.cat(outs, dim=2), state
    dtype = inputs[0].dtype
    *inputs, initial_state = upcast_half(*inputs, initial_state)
    if inputs[0].shape[2] == 1:
        o, state = step(*inputs, initial_state)
    else:
        o, state = chunked(*inputs, initial_state, chunk_size)
    return o.to(dtype), state


def gated_linear_attention(q, k, v, g, initial_state=None, chunk_size: int | None = None):
    """(o [B, Hq, T, V] in q's dtype, final state [B, Hkv, K, V] in float32 or wider). One token: the recurrence
    step; CUDA with fla-core: chunk_gla; elsewhere the chunked torch path."""
    if q.shape[2] > 1 and _use_fla(q):
        return gla_fla(q, k, v, g, initial_state)
    return torch_path_in_float32(gla_step, gla_chunked, q, k, v, g, initial_state=initial_state,
                                 chunk_size=chunk_size or DEFAULT_CHUNK)

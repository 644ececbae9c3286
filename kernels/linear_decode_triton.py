"""One decoding step of a GLA-type linearized layer on a GPU in one Triton launch (the CUDA counterpart of
linear_decode_cpu.py's `linear_decode_step`, same results; it takes the features, which the C step computes
itself): the gated recurrence updated in place, its read-out (optionally normalized), and the Liger Attention
hybrid's sliding-window branch over its ring buffer, whose oldest slot the new token then replaces. fla-core has
no such step (its fused-recurrent kernels take no window branch); forward's torch path (kernels/gla.py gla_step,
window_attention.py, LinearizedLayer.store: ~40 small launches per layer) is the reference the tests compare
with, token by token, under the interpreter.

One program per (batch row, KV head): the state [K, V (+1)] and the window's slots loaded once into registers for the
G query heads of the group, each head's read-out a product and a sum over them in fp32 (a padded tl.dot in fp32
spilled kilobytes per thread: compile_check, sm_90)."""
from __future__ import annotations

import torch

from .dispatch import power_of_two

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the C kernel and the torch path run without triton
    triton = None


# window slots / GSA slots the kernels hold in registers: 128 at head_dim 128 sat at 255 registers, 256 spilled
# (compile_check, sm_90); larger windows take the torch path
MAX_SLOTS = 128


def _supported(state: torch.Tensor, dims, rings=()) -> bool:
    """The tiles the kernels take: power-of-two dims of at least 16; float32 contiguous state (and ring buffers),
    updated in place; gradients off (training keeps forward's torch path)."""
    return (triton is not None and not torch.is_grad_enabled()
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in (state, *rings))
            and all(power_of_two(n) and n >= 16 for n in dims))


def linear_decode_triton_supported(state: torch.Tensor, normalize: bool, ring_k=None, ring_v=None,
                                   ring_valid=None) -> bool:
    """state [B, H, K, V (+1)]; the hybrid's ring buffers [B, H, slots <= MAX_SLOTS, D], validity bool [B, slots]."""
    dims = [state.shape[2], state.shape[3] - int(normalize)]
    if ring_k is None:
        return _supported(state, dims)
    return (ring_k.shape[2] <= MAX_SLOTS and ring_valid.dtype == torch.bool and ring_valid.is_contiguous()
            and _supported(state, dims + [ring_k.shape[3]], (ring_k, ring_v)))


def mom_triton_supported(state: torch.Tensor) -> bool:
    """state [B, M + 1, H, K, V]."""
    return _supported(state, state.shape[3:])


def gsa_triton_supported(state: torch.Tensor, k_dim: int) -> bool:
    """packed state [B, H, M <= MAX_SLOTS, K + V]."""
    return state.shape[2] <= MAX_SLOTS and _supported(state, (k_dim, state.shape[3] - k_dim))


def _valid_bytes(new_valid, device):
    """Which batch rows' new token is real, as uint8 [B] (None: all are)."""
    return None if new_valid is None else new_valid.to(device=device, dtype=torch.uint8).contiguous()


if triton is not None:

    @triton.jit(do_not_specialize=["slot", "H"])  # one compiled kernel whatever the slot (0, 1, 16, ... )
    def _linear_decode_kernel(phi_q, phi_k, log_gate, v_state, state, q_rot, k_rot, v_new, ring_k, ring_v,
                              ring_valid, new_valid, out, slot, alpha, beta, scale, H,
                              G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, NORMALIZE: tl.constexpr,
                              WINDOW: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, D: tl.constexpr,
                              HAS_VALID: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        b = bh // H
        VS: tl.constexpr = V + NORMALIZE  # the state's row length (a ones column carries z when normalized)
        kk = tl.arange(0, K)
        cc = tl.arange(0, V)
        valid = tl.load(new_valid + b).to(tl.int32) if HAS_VALID else 1
        # the recurrence: S = diag(exp(g)) S + phi(k)^T v for a real token; a padding token leaves S as it is
        s_ptr = state + bh * K * VS + kk[:, None] * VS + cc[None, :]
        z_ptr = state + bh * K * VS + kk * VS + V
        s = tl.load(s_ptr)
        z = tl.load(z_ptr) if NORMALIZE else tl.zeros([K], dtype=tl.float32)
        decay = tl.exp(tl.load(log_gate + bh * K + kk))
        pk = tl.load(phi_k + bh * K + kk)
        if valid != 0:
            s = decay[:, None] * s + pk[:, None] * tl.load(v_state + bh * VS + cc)[None, :]
            if NORMALIZE:
                z = decay * z + pk * tl.load(v_state + bh * VS + V)
        # the state is updated in place, and a layout may give several threads copies of one element (z on sm_90):
        # every copy is read before any is written
        tl.debug_barrier()
        if valid != 0:
            tl.store(s_ptr, s)
            if NORMALIZE:
                tl.store(z_ptr, z)
        if WINDOW:  # the ring buffer's slots, read once for the G query heads
            dd = tl.arange(0, D)
            jj = tl.arange(0, SP)
            jmask = jj < S
            rk = tl.load(ring_k + (bh * S + jj)[:, None] * D + dd[None, :], mask=jmask[:, None], other=0.0)
            rv = tl.load(ring_v + (bh * S + jj)[:, None] * V + cc[None, :], mask=jmask[:, None], other=0.0)
            seen = jmask & (tl.load(ring_valid + b * S + jj, mask=jmask, other=0) != 0)
            kn = tl.load(k_rot + bh * D + dd)
            vn = tl.load(v_new + bh * V + cc)
        # per query head of the group (G is 1-8): products and sums over the tiles in registers, no padded dot
        for i in tl.static_range(G):
            row = bh * G + i
            q = tl.load(phi_q + row * K + kk)
            o = tl.sum(q[:, None] * s, axis=0)  # phi(q) S  [V]
            if NORMALIZE:  # divided by phi(q) . z: a weighted mean of values
                o = o * (1.0 / tl.maximum(tl.sum(q * z, axis=0), 1e-6))
            if WINDOW:  # softmax over the seen slots and the new key; alpha * recurrent + beta * window
                qr = tl.load(q_rot + row * D + dd)
                scores = tl.where(seen, tl.sum(qr[None, :] * rk, axis=1) * scale, float("-inf"))
                s_new = tl.where(valid != 0, tl.sum(qr * kn, axis=0) * scale, float("-inf"))
                mx = tl.maximum(tl.max(scores, axis=0), s_new)
                any_seen = mx > float("-inf")
                mx = tl.where(any_seen, mx, 0.0)
                p = tl.exp(scores - mx)  # exp(-inf) = 0 for slots not seen
                p_new = tl.exp(s_new - mx)
                total = tl.sum(p, axis=0) + p_new
                w = tl.sum(p[:, None] * rv, axis=0) + p_new * vn
                w = w * tl.where(any_seen, 1.0 / tl.where(any_seen, total, 1.0), 0.0)
                o = alpha * o + beta * w
            tl.store(out + row * V + cc, o)
        if WINDOW:  # every thread has read the slot before it is overwritten with the new token (zeros if padding)
            tl.debug_barrier()
            tl.store(ring_k + (bh * S + slot) * D + dd, kn)
            tl.store(ring_v + (bh * S + slot) * V + cc, tl.where(valid != 0, vn, 0.0))

    @triton.jit(do_not_specialize=["H", "M1"])
    def _mom_decode_kernel(phi_q, k, v, log_gate, beta, state, active, mix, new_valid, out, out_scale, H, M1,
                           G: tl.constexpr, GP: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                           HAS_VALID: tl.constexpr):
        """Per (b, h): every memory m (0: the shared one) takes the gated delta-rule step when routed and the token
        is real, S = a S + k (beta (v - k^T a S))^T, and out = out_scale * sum_m mix_m phi(q) S_m."""
        bh = tl.program_id(0).to(tl.int64)
        b = bh // H
        h = bh % H
        kk = tl.arange(0, K)
        cc = tl.arange(0, V)
        rows = tl.arange(0, GP)
        valid = tl.load(new_valid + b).to(tl.int32) if HAS_VALID else 1
        kh = tl.load(k + bh * K + kk)
        vh = tl.load(v + bh * V + cc)
        a = tl.exp(tl.load(log_gate + bh))
        bt = tl.load(beta + bh)
        acc = tl.zeros([GP, V], dtype=tl.float32)
        for m in range(M1):
            s_ptr = state + ((b * M1 + m) * H + h) * K * V + kk[:, None] * V + cc[None, :]
            s = tl.load(s_ptr)
            update = valid * tl.load(active + b * M1 + m).to(tl.int32)
            if update != 0:
                corr = bt * (vh - a * tl.sum(kh[:, None] * s, axis=0))
                s = a * s + kh[:, None] * corr[None, :]
            tl.debug_barrier()  # in place: every copy of an element read before any is written
            if update != 0:
                tl.store(s_ptr, s)
            w = tl.load(mix + b * M1 + m) * out_scale
            for i in tl.static_range(G):
                q = tl.load(phi_q + (bh * G + i) * K + kk)
                acc = tl.where(rows[:, None] == i, acc + (w * tl.sum(q[:, None] * s, axis=0))[None, :], acc)
        tl.store(out + (bh * G + rows)[:, None] * V + cc[None, :], acc, mask=(rows < G)[:, None])

    @triton.jit(do_not_specialize=["H", "M"])
    def _gsa_decode_kernel(phi_q, k, v, log_gate, state, new_valid, out, H, M,
                           G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, MP: tl.constexpr,
                           HAS_VALID: tl.constexpr):
        """Per (b, h): slot j's key and value move toward the new ones, a_j x + (1 - a_j) new (a real token only);
        each query head reads the slots with a softmax over phi(q) . key_j."""
        bh = tl.program_id(0).to(tl.int64)
        b = bh // H
        kk = tl.arange(0, K)
        cc = tl.arange(0, V)
        jj = tl.arange(0, MP)
        jmask = jj < M
        base = state + bh * M * (K + V) + jj[:, None] * (K + V)
        keys = tl.load(base + kk[None, :], mask=jmask[:, None], other=0.0)
        vals = tl.load(base + K + cc[None, :], mask=jmask[:, None], other=0.0)
        valid = tl.load(new_valid + b).to(tl.int32) if HAS_VALID else 1
        if valid != 0:
            a = tl.exp(tl.load(log_gate + bh * M + jj, mask=jmask, other=0.0))
            keys = a[:, None] * keys + (1.0 - a)[:, None] * tl.load(k + bh * K + kk)[None, :]
            vals = a[:, None] * vals + (1.0 - a)[:, None] * tl.load(v + bh * V + cc)[None, :]
        tl.debug_barrier()  # in place: small tiles are replicated over warps; every copy read before any write
        if valid != 0:
            tl.store(base + kk[None, :], keys, mask=jmask[:, None])
            tl.store(base + K + cc[None, :], vals, mask=jmask[:, None])
        for i in tl.static_range(G):
            q = tl.load(phi_q + (bh * G + i) * K + kk)
            p = tl.where(jmask, tl.sum(q[None, :] * keys, axis=1), float("-inf"))
            e = tl.exp(p - tl.max(p, axis=0))
            o = tl.sum(e[:, None] * vals, axis=0) * (1.0 / tl.sum(e, axis=0))
            tl.store(out + (bh * G + i) * V + cc, o)


def linear_decode_step_triton(phi_q, phi_k, log_gate, v_state, state, normalize: bool, window=None, new_valid=None,
                              alpha: float = 0.0, beta: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """`linear_decode_cpu.linear_decode_step` on a GPU (or the interpreter), from the features: phi_q [B, Hq, 1, K],
    phi_k and log_gate [B, H, 1, K], v_state [B, H, 1, V + normalize] (the ones column appended); the same window
    tuple, state and ring buffers updated in place, out [B, Hq, 1, V]."""
    phi_q, phi_k, log_gate, v_state = (t.float().contiguous() for t in (phi_q, phi_k, log_gate, v_state))
    b, hq, _, k_dim = phi_q.shape
    h, vs_dim = state.shape[1], state.shape[-1]
    v_dim, groups = vs_dim - int(normalize), hq // h
    out = phi_q.new_empty(b, hq, 1, v_dim)
    dummy = phi_q.new_zeros(1)
    valid = _valid_bytes(new_valid, state.device)
    if window is None:
        q_rot = k_rot = v = ring_k = ring_v = dummy
        ring_valid, slots, slot, d_rot = valid if valid is not None else dummy, 0, 0, 16
    else:
        q_rot, k_rot, v, ring_k, ring_v, ring_valid_bool, slot = window
        q_rot, k_rot, v = (t.float().contiguous() for t in (q_rot, k_rot, v))
        ring_valid = ring_valid_bool.view(torch.uint8)
        slots, d_rot = ring_k.shape[2], ring_k.shape[3]
    _linear_decode_kernel[(b * h,)](
        phi_q, phi_k, log_gate, v_state, state, q_rot, k_rot, v, ring_k, ring_v, ring_valid,
        valid if valid is not None else dummy, out, slot, float(alpha), float(beta), float(scale), h,
        G=groups, K=k_dim, V=v_dim, NORMALIZE=int(normalize),
        WINDOW=window is not None, S=max(slots, 1), SP=max(16, triton.next_power_of_2(max(slots, 1))), D=d_rot,
        HAS_VALID=valid is not None, num_warps=8)
    if window is not None:  # after every head of a batch row has read the slot's validity (shared by its heads)
        ring_valid_bool[:, slot] = True if new_valid is None else new_valid.to(ring_valid_bool.device, torch.bool)
    return out


def mom_decode_step_triton(phi_q, k, v, log_gate, beta, state, active, mix, new_valid=None,
                           out_scale: float = 1.0) -> torch.Tensor:
    """`linear_decode_cpu.mom_decode_step` on a GPU (or the interpreter): same arguments, state updated in place."""
    phi_q, k, v, log_gate, beta, mix = (t.float().contiguous() for t in (phi_q, k, v, log_gate, beta, mix))
    active = active.to(torch.uint8).contiguous()
    b, hq, _, k_dim = phi_q.shape
    m1, h, v_dim = state.shape[1], state.shape[2], state.shape[-1]
    out = phi_q.new_empty(b, hq, 1, v_dim)
    valid = _valid_bytes(new_valid, state.device)
    _mom_decode_kernel[(b * h,)](phi_q, k, v, log_gate, beta, state, active, mix,
                                 valid if valid is not None else active, out, float(out_scale), h, m1,
                                 G=hq // h, GP=triton.next_power_of_2(hq // h), K=k_dim, V=v_dim,
                                 HAS_VALID=valid is not None, num_warps=8)
    return out


def gsa_decode_step_triton(phi_q, phi_k, v, log_gate, state, new_valid=None) -> torch.Tensor:
    """`linear_decode_cpu.gsa_decode_step` on a GPU (or the interpreter): same arguments, state updated in place."""
    phi_q, phi_k, v, log_gate = (t.float().contiguous() for t in (phi_q, phi_k, v, log_gate))
    b, hq, _, k_dim = phi_q.shape
    h, slots, v_dim = state.shape[1], state.shape[2], v.shape[-1]
    out = phi_q.new_empty(b, hq, 1, v_dim)
    valid = _valid_bytes(new_valid, state.device)
    _gsa_decode_kernel[(b * h,)](phi_q, phi_k, v, log_gate, state, valid if valid is not None else out, out, h, slots,
                                 G=hq // h, K=k_dim, V=v_dim, MP=max(2, triton.next_power_of_2(slots)),
                                 HAS_VALID=valid is not None, num_warps=4)
    return out

"""One decoding step of a linearized layer on a GPU in one Triton launch, the CUDA counterparts of
linear_decode_cpu.py's steps with the same arguments and results (from the raw projections: the feature maps, gates,
MoM's routing and the hybrid's RoPE are computed inside, as in the C steps, so a layer's step is one launch after
its projections, not ~10-20): `linear_decode_step_triton`, the gated recurrence updated in place, its read-out
(optionally normalized), and the Liger Attention hybrid's sliding-window branch over its ring buffer, whose oldest
slot the new token then replaces; `mom_decode_step_triton`; `gsa_decode_step_triton`. fla-core has no such step (its
fused-recurrent kernels take no window branch); forward's torch path (kernels/gla.py gla_step, window_attention.py,
LinearizedLayer.store: ~40 small launches per layer) is the reference the tests compare with, token by token, under
the interpreter.

One program per (batch row, KV head), serving the G query heads of the group: each head's read-out a product and a
sum in registers in fp32 (a padded tl.dot in fp32 spilled kilobytes per thread: compile_check, sm_90). The GLA
state goes through in column chunks, then the window's slots: at head_dim 128 the whole state tile beside the slots
took 244-255 registers (the normalized state's rows, V + 1 floats long, load unvectorized), chunks 99-146, no
spills."""
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

    @triton.jit
    def _log_sigmoid(x):
        return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))

    @triton.jit
    def _softmax(x):
        e = tl.exp(x - tl.max(x, axis=0))
        return e / tl.sum(e, axis=0)

    @triton.jit
    def _key_features(kr, GATE: tl.constexpr):
        """Liger's phi(k) and per-dimension log-gate from the raw key: GATE 1 (GLA) softmax(k), logsigmoid(k) / 16;
        GATE 2 (HGRN2) 1 - sigmoid(k), logsigmoid(k)."""
        if GATE == 1:
            return _softmax(kr), _log_sigmoid(kr) * (1.0 / 16.0)
        return 1.0 / (1.0 + tl.exp(kr)), _log_sigmoid(kr)

    @triton.jit
    def _rope(ptr, cos, sin, dd, D: tl.constexpr):
        """x cos + rotate_half(x) sin for the row at ptr: rotate_half(x) = (-x[D/2:], x[:D/2])."""
        x = tl.load(ptr + dd)
        swapped = tl.load(ptr + (dd + D // 2) % D)
        return x * cos + tl.where(dd < D // 2, -swapped, swapped) * sin

    @triton.jit(do_not_specialize=["slot", "H"])  # one compiled kernel whatever the slot (0, 1, 16, ... )
    def _linear_decode_kernel(q, k, v, state, q_rot, k_rot, rope_cos, rope_sin, ring_k, ring_v,
                              ring_valid, new_valid, out, slot, alpha, beta, scale, H,
                              G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, NORMALIZE: tl.constexpr,
                              GATE: tl.constexpr, WINDOW: tl.constexpr, ROPE: tl.constexpr, S: tl.constexpr,
                              SP: tl.constexpr, D: tl.constexpr, VC: tl.constexpr, HAS_VALID: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        b = bh // H
        VS: tl.constexpr = V + NORMALIZE  # the state's row length (a ones column carries z when normalized)
        kk = tl.arange(0, K)
        cc = tl.arange(0, V)
        cj = tl.arange(0, VC)
        valid = tl.load(new_valid + b).to(tl.int32) if HAS_VALID else 1
        pk, log_gate = _key_features(tl.load(k + bh * K + kk), GATE)
        decay = tl.exp(log_gate)
        base = state + bh * K * VS
        # the recurrence: S = diag(exp(g)) S + phi(k)^T v for a real token; a padding token leaves S as it is.
        # Updated in place, and a layout may give several threads copies of one element (z on sm_90): every copy is
        # read before any is written (the barriers)
        if NORMALIZE:  # z first: the read-outs' denominators
            z_ptr = base + kk * VS + V
            z = tl.load(z_ptr)
            if valid != 0:
                z = decay * z + pk
            tl.debug_barrier()
            if valid != 0:
                tl.store(z_ptr, z)
        # then the state in column chunks of VC, each read out for the G query heads at once (G is 1-8: products
        # and sums in registers, no padded dot): a [K, VC] tile at a time keeps registers low (rows of the
        # normalized state, V + 1 long, load unvectorized; at head_dim 128 the whole tile spilled on sm_90)
        for c0 in tl.static_range(0, V, VC):
            s_ptr = base + kk[:, None] * VS + (c0 + cj)[None, :]
            s = tl.load(s_ptr)
            if valid != 0:
                s = decay[:, None] * s + pk[:, None] * tl.load(v + bh * V + c0 + cj)[None, :]
            tl.debug_barrier()
            if valid != 0:
                tl.store(s_ptr, s)
            for i in tl.static_range(G):
                row = bh * G + i
                pq = _softmax(tl.load(q + row * K + kk))
                o = tl.sum(pq[:, None] * s, axis=0)  # phi(q) S  [VC]
                if NORMALIZE:  # divided by phi(q) . z: a weighted mean of values
                    o = o * (1.0 / tl.maximum(tl.sum(pq * z, axis=0), 1e-6))
                tl.store(out + row * V + c0 + cj, alpha * o if WINDOW else o)
        if WINDOW:  # softmax over the seen slots and the new key; alpha * recurrent + beta * window
            tl.debug_barrier()  # the read-outs just stored are read back below, maybe by other threads
            dd = tl.arange(0, D)
            jj = tl.arange(0, SP)
            jmask = jj < S
            rk = tl.load(ring_k + (bh * S + jj)[:, None] * D + dd[None, :], mask=jmask[:, None], other=0.0)
            rv = tl.load(ring_v + (bh * S + jj)[:, None] * V + cc[None, :], mask=jmask[:, None], other=0.0)
            seen = jmask & (tl.load(ring_valid + b * S + jj, mask=jmask, other=0) != 0)
            vn = tl.load(v + bh * V + cc)
            if ROPE:
                cos = tl.load(rope_cos + b * D + dd)
                sin = tl.load(rope_sin + b * D + dd)
                kn = _rope(k + bh * D, cos, sin, dd, D)
            else:
                kn = tl.load(k_rot + bh * D + dd)
            for i in tl.static_range(G):
                row = bh * G + i
                if ROPE:
                    qr = _rope(q + row * D, cos, sin, dd, D)
                else:
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
                tl.store(out + row * V + cc, tl.load(out + row * V + cc) + beta * w)
            # every thread has read the slot before it is overwritten with the new token (zeros if padding)
            tl.debug_barrier()
            tl.store(ring_k + (bh * S + slot) * D + dd, tl.where(valid != 0, kn, 0.0))
            tl.store(ring_v + (bh * S + slot) * V + cc, tl.where(valid != 0, vn, 0.0))

    @triton.jit(do_not_specialize=["H", "M"])
    def _mom_decode_kernel(q, k, v, beta_logit, router_logits, state, new_valid, out, out_scale, H, M,
                           G: tl.constexpr, GP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, MP: tl.constexpr,
                           TOP_K: tl.constexpr, SHARED: tl.constexpr, GATE: tl.constexpr,
                           HAS_VALID: tl.constexpr):
        """Per (b, h): the row's routing (the shared memory, weight 1, and the top-k routed ones by softmax
        probability, renormalized over the chosen: recomputed by each of the row's programs, M is small); unit keys
        phi(k) / |phi(k)|, decay exp(mean log-gate), write strength sigmoid(beta_logit); every memory m (0: the
        shared one) takes the gated delta-rule step when routed and the token is real,
        S = a S + key (beta (v - key^T a S))^T, and out = out_scale * sum_m mix_m phi(q) S_m."""
        bh = tl.program_id(0).to(tl.int64)
        b = bh // H
        h = bh % H
        kk = tl.arange(0, K)
        cc = tl.arange(0, V)
        rows = tl.arange(0, GP)
        mm = tl.arange(0, MP)
        probs = _softmax(tl.load(router_logits + b * M + mm, mask=mm < M, other=float("-inf")))
        chosen = mm < 0
        for _ in tl.static_range(TOP_K):  # ties: the lower index, as the C step
            pick = tl.argmax(tl.where(chosen | (mm >= M), -1.0, probs), axis=0)
            chosen = chosen | (mm == pick)
        weights = tl.where(chosen, probs, 0.0)
        weights = weights / tl.sum(weights, axis=0)
        valid = tl.load(new_valid + b).to(tl.int32) if HAS_VALID else 1
        kr = tl.load(k + bh * K + kk)
        key, log_gate = _key_features(kr, GATE)
        key = key / tl.maximum(tl.sqrt(tl.sum(key * key, axis=0)), 1e-12)
        a = tl.exp(tl.sum(log_gate, axis=0) / K)
        bt = 1.0 / (1.0 + tl.exp(-tl.load(beta_logit + bh)))
        vh = tl.load(v + bh * V + cc)
        acc = tl.zeros([GP, V], dtype=tl.float32)
        for m in range(M + SHARED):
            s_ptr = state + ((b * (M + SHARED) + m) * H + h) * K * V + kk[:, None] * V + cc[None, :]
            s = tl.load(s_ptr)
            routed = mm == m - SHARED
            active = tl.sum(tl.where(routed & chosen, 1, 0), axis=0)
            w = tl.sum(tl.where(routed, weights, 0.0), axis=0)
            if SHARED:
                active = tl.where(m == 0, 1, active)
                w = tl.where(m == 0, 1.0, w)
            update = valid * active
            if update != 0:
                corr = bt * (vh - a * tl.sum(key[:, None] * s, axis=0))
                s = a * s + key[:, None] * corr[None, :]
            tl.debug_barrier()  # in place: every copy of an element read before any is written
            if update != 0:
                tl.store(s_ptr, s)
            for i in tl.static_range(G):
                pq = _softmax(tl.load(q + (bh * G + i) * K + kk))
                acc = tl.where(rows[:, None] == i, acc + (w * out_scale * tl.sum(pq[:, None] * s, axis=0))[None, :],
                               acc)
        tl.store(out + (bh * G + rows)[:, None] * V + cc[None, :], acc, mask=(rows < G)[:, None])

    @triton.jit(do_not_specialize=["H", "M"])
    def _gsa_decode_kernel(q, k, v, state, new_valid, out, H, M,
                           G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, MP: tl.constexpr,
                           HAS_VALID: tl.constexpr):
        """Per (b, h): phi(k) = softmax(k); slot j's gate the mean of logsigmoid(k) / 16 over dimensions
        [floor(j K / M), ceil((j + 1) K / M)) (torch's adaptive pooling); slot j's key and value move toward the new
        ones, a_j x + (1 - a_j) new (a real token only); each query head reads the slots with a softmax over
        phi(q) . key_j."""
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
            kr = tl.load(k + bh * K + kk)
            pk = _softmax(kr)
            lo = jj * K // M
            hi = ((jj + 1) * K + M - 1) // M
            inside = (kk[None, :] >= lo[:, None]) & (kk[None, :] < hi[:, None])
            gate = tl.sum(tl.where(inside, (_log_sigmoid(kr) * (1.0 / 16.0))[None, :], 0.0), axis=1)
            a = tl.where(jmask, tl.exp(gate / tl.maximum(hi - lo, 1).to(tl.float32)), 1.0)
            keys = a[:, None] * keys + (1.0 - a)[:, None] * pk[None, :]
            vals = a[:, None] * vals + (1.0 - a)[:, None] * tl.load(v + bh * V + cc)[None, :]
        tl.debug_barrier()  # in place: small tiles are replicated over warps; every copy read before any write
        if valid != 0:
            tl.store(base + kk[None, :], keys, mask=jmask[:, None])
            tl.store(base + K + cc[None, :], vals, mask=jmask[:, None])
        for i in tl.static_range(G):
            pq = _softmax(tl.load(q + (bh * G + i) * K + kk))
            p = tl.where(jmask, tl.sum(pq[None, :] * keys, axis=1), float("-inf"))
            e = tl.exp(p - tl.max(p, axis=0))
            o = tl.sum(e[:, None] * vals, axis=0) * (1.0 / tl.sum(e, axis=0))
            tl.store(out + (bh * G + i) * V + cc, o)


GATES = {"gla": 1, "hgrn2": 2}  # as the C steps'


def linear_decode_step_triton(q, k, v, state, gate: str, normalize: bool, window=None, new_valid=None,
                              alpha: float = 0.0, beta: float = 0.0, scale: float = 1.0, rope=None) -> torch.Tensor:
    """`linear_decode_cpu.linear_decode_step` on a GPU (or the interpreter), same arguments: the raw projections
    q [B, Hq, 1, K], k [B, H, 1, K], v [B, H, 1, V]; the window tuple (q_rot and k_rot None when rope = (cos, sin)
    [B, 1, K] is given); state and ring buffers updated in place; out [B, Hq, 1, V]."""
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    b, hq, _, k_dim = q.shape
    h, vs_dim = state.shape[1], state.shape[-1]
    v_dim, groups = vs_dim - int(normalize), hq // h
    out = q.new_empty(b, hq, 1, v_dim)
    dummy = q.new_zeros(1)
    valid = _valid_bytes(new_valid, state.device)
    q_rot = k_rot = cos = sin = ring_k = ring_v = dummy
    if window is None:
        ring_valid, slots, slot, d_rot = valid if valid is not None else dummy, 0, 0, 16
    else:
        q_rot, k_rot, _, ring_k, ring_v, ring_valid_bool, slot = window
        if rope is None:
            q_rot, k_rot = (t.float().contiguous() for t in (q_rot, k_rot))
        else:
            q_rot = k_rot = dummy
            cos, sin = (t.float().contiguous() for t in rope)
        ring_valid = ring_valid_bool.view(torch.uint8)
        slots, d_rot = ring_k.shape[2], ring_k.shape[3]
    _linear_decode_kernel[(b * h,)](
        q, k, v, state, q_rot, k_rot, cos, sin, ring_k, ring_v, ring_valid,
        valid if valid is not None else dummy, out, slot, float(alpha), float(beta), float(scale), h,
        G=groups, K=k_dim, V=v_dim, NORMALIZE=int(normalize), GATE=GATES[gate],
        WINDOW=window is not None, ROPE=window is not None and rope is not None, S=max(slots, 1),
        SP=max(16, triton.next_power_of_2(max(slots, 1))), D=d_rot, VC=min(v_dim, 32), HAS_VALID=valid is not None,
        num_warps=8)
    if window is not None:  # after every head of a batch row has read the slot's validity (shared by its heads)
        ring_valid_bool[:, slot] = True if new_valid is None else new_valid.to(ring_valid_bool.device, torch.bool)
    return out


def mom_decode_step_triton(q, k, v, beta_logit, router_logits, state, gate: str, top_k: int, shared: bool,
                           new_valid=None, out_scale: float = 1.0) -> torch.Tensor:
    """`linear_decode_cpu.mom_decode_step` on a GPU (or the interpreter): same arguments, state updated in place."""
    q, k, v, beta_logit, router_logits = (t.float().contiguous() for t in (q, k, v, beta_logit, router_logits))
    b, hq, _, k_dim = q.shape
    memories, h, v_dim = router_logits.shape[-1], state.shape[2], state.shape[-1]
    out = q.new_empty(b, hq, 1, v_dim)
    valid = _valid_bytes(new_valid, state.device)
    _mom_decode_kernel[(b * h,)](q, k, v, beta_logit, router_logits, state, valid if valid is not None else out, out,
                                 float(out_scale), h, memories, G=hq // h, GP=triton.next_power_of_2(hq // h),
                                 K=k_dim, V=v_dim, MP=max(2, triton.next_power_of_2(memories)), TOP_K=top_k,
                                 SHARED=int(shared), GATE=GATES[gate], HAS_VALID=valid is not None, num_warps=8)
    return out


def gsa_decode_step_triton(q, k, v, state, new_valid=None) -> torch.Tensor:
    """`linear_decode_cpu.gsa_decode_step` on a GPU (or the interpreter): same arguments, state updated in place."""
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    b, hq, _, k_dim = q.shape
    h, slots, v_dim = state.shape[1], state.shape[2], v.shape[-1]
    out = q.new_empty(b, hq, 1, v_dim)
    valid = _valid_bytes(new_valid, state.device)
    _gsa_decode_kernel[(b * h,)](q, k, v, state, valid if valid is not None else out, out, h, slots,
                                 G=hq // h, K=k_dim, V=v_dim, MP=max(2, triton.next_power_of_2(slots)),
                                 HAS_VALID=valid is not None, num_warps=4)
    return out

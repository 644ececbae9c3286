"""One decoding step of a linearized attention layer on the CPU in one C call per layer (csrc/linear_decode.c, built
on first use by cpu_build.py), its state updated in place:
- `linear_decode_step`: the GLA / HGRN2 recurrence, its read-out (optionally normalized), and the hybrid's
  sliding-window branch over its ring buffer (reference: kernels/gla.py `gla_step`, kernels/window_attention.py,
  LinearizedLayer.store);
- `mom_decode_step`: Mixture-of-Memories' features, top-k routing and routed gated delta-rule memories (reference:
  linearize/mom.py's forward with kernels/delta_rule.py);
- `gsa_decode_step`: gated slot attention, its feature maps and slot gates (reference: kernels/gsa.py).
The attention modules' torch forward is what the tests compare them with, token by token."""
from __future__ import annotations

import ctypes

import torch

from .cpu_build import load_c_library


_I64, _PTR, _F32, _I32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_SIGNATURES = (("linear_decode_step",
                (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I32, _I32, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR,
                 _PTR, _I64, _I64, _I64, _PTR, _F32, _F32, _F32, _PTR, _I32),
                ctypes.c_int),
               ("mom_decode_steps",
                (_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I32, _I64, _I32, _I64, _I64, _I64, _I64, _PTR,
                 _F32, _PTR, _I32),
                ctypes.c_int),
               ("exp_vec_array", (_PTR, _I64, _PTR), None),
               ("gsa_decode_step",
                (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I32), ctypes.c_int))


def _library():
    return load_c_library("linear_decode", _SIGNATURES)


def linear_decode_available() -> bool:
    """The C steps are built here (a compiler, COMPRESS_CPU_KERNELS not off): what `compress inspect` reports."""
    return _library() is not None


def _ready(*tensors) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def _valid(new_valid):
    """(bool [B] contiguous, its pointer) or (None, None): which batch rows' new token is real (not padding)."""
    if new_valid is None:
        return None, None
    new_valid = new_valid.to(torch.bool).contiguous()
    return new_valid, new_valid.data_ptr()


def linear_decode_supported(state: torch.Tensor, ring_k=None, ring_v=None, ring_valid=None) -> bool:
    """fp32 contiguous CPU state and ring buffers (updated in place), gradients off, and the compiled library."""
    rings = () if ring_k is None else (ring_k, ring_v)
    return (not torch.is_grad_enabled() and _ready(state, *rings) and _library() is not None
            and (ring_valid is None or (ring_valid.dtype == torch.bool and ring_valid.is_contiguous())))


GATES = {"gla": 1, "hgrn2": 2}  # the C step's feature maps (linearize/attention.py `features`)


def linear_decode_step(q, k, v, state, gate: str, normalize: bool, window=None, new_valid=None, alpha: float = 0.0,
                       beta: float = 0.0, scale: float = 1.0, rope=None) -> torch.Tensor:
    """From the raw projections q [B, Hq, 1, K], k [B, H, 1, K], v [B, H, 1, V] (before RoPE): the C step applies
    Liger's feature map for `gate` ("gla" or "hgrn2") and the normalized state's ones column itself (~8 small torch
    ops per layer and step fewer than computing them here). state [B, H, K, V + normalize] (updated in place);
    window: None, or (q_rot [B, Hq, 1, D], k_rot [B, H, 1, D], v, ring_k [B, H, S, D], ring_v [B, H, S, V],
    ring_valid bool [B, S], slot), the Triton step's tuple (its v is this v), whose ring entries at `slot` are
    overwritten by the new token; q_rot and k_rot may be None when rope = (cos, sin) [B, 1, K] is given: the step
    then rotates q and k itself, Llama's x cos + rotate_half(x) sin (~12 small torch ops per layer fewer; for models
    whose RoPE function computes exactly that, `attention.rotate_half_rope`). new_valid bool [B] or None.
    Returns out [B, Hq, 1, V]."""
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    b, hq, _, k_dim = q.shape
    h, vs_dim = state.shape[1], state.shape[-1]
    out = q.new_empty(b, hq, 1, vs_dim - int(normalize))
    new_valid, valid_ptr = _valid(new_valid)
    if window is None:
        slots = slot = d_rot = 0
        ptrs = (None,) * 7
    else:
        q_rot, k_rot, _, ring_k, ring_v, ring_valid, slot = window
        rotated = (q_rot, k_rot) if rope is None else rope  # kept alive until the call returns
        rotated = tuple(t.float().contiguous() for t in rotated)
        pointers = tuple(t.data_ptr() for t in rotated)
        slots, d_rot = ring_k.shape[2], ring_k.shape[3]
        ptrs = ((*pointers, None, None) if rope is None else (None, None, *pointers)) + \
            (ring_k.data_ptr(), ring_v.data_ptr(), ring_valid.data_ptr())
    status = _library().linear_decode_step(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), state.data_ptr(), b, h, hq // h, k_dim, vs_dim, int(normalize),
        GATES[gate], *ptrs, slots, slot, d_rot, valid_ptr, alpha, beta, scale, out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError("linear_decode_step: could not allocate its per-head buffers")
    return out


def mom_decode_step(q, k, v, beta_logit, router_logits, state, gate: str, top_k: int, shared: bool,
                    new_valid=None, out_scale: float = 1.0) -> torch.Tensor:
    """Mixture-of-Memories steps from the raw projections q [B, Hq, T, K], k [B, H, T, K], v [B, H, T, V] (before
    RoPE), the write-strength logits beta_logit [B, T, H] and the router logits [B, T, M], token after token (T = 1
    when decoding; a prompt without gradients too): the C step applies the feature maps, the unit keys, the per-head
    decay, the sigmoid and the top-k routing itself (linearize/mom.py's forward is the reference). state
    [B, M + shared, H, K, V] (updated in place; memory 0 is the shared one); new_valid bool [B] (T = 1) or [B, T],
    or None. Returns out [B, Hq, T, V] = out_scale * sum_m mix_m phi(q) S_m."""
    b, hq, t, k_dim = q.shape
    # token-major, so that each token's inputs are one contiguous block
    q, k, v = (x.float().permute(2, 0, 1, 3).contiguous() for x in (q, k, v))
    beta_logit, router_logits = (x.float().transpose(0, 1).contiguous() for x in (beta_logit, router_logits))
    memories, h, v_dim = router_logits.shape[-1], state.shape[2], state.shape[-1]
    out = q.new_empty(t, b, hq, v_dim)
    if new_valid is not None and new_valid.dim() == 2:
        new_valid = new_valid.transpose(0, 1)
    new_valid, valid_ptr = _valid(new_valid)
    status = _library().mom_decode_steps(
        t, q.data_ptr(), k.data_ptr(), v.data_ptr(), beta_logit.data_ptr(), router_logits.data_ptr(),
        state.data_ptr(), b, memories, int(shared), top_k, GATES[gate], h, hq // h, k_dim, v_dim, valid_ptr, out_scale,
        out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError("mom_decode_step: could not allocate its per-head buffers")
    return out.permute(1, 2, 0, 3)


def exp_vec(x: torch.Tensor) -> torch.Tensor:
    """The C steps' vectorized exp (csrc/linear_decode.c `exp_vec`) on a float32 tensor: for tests."""
    x = x.float().contiguous()
    out = torch.empty_like(x)
    _library().exp_vec_array(x.data_ptr(), x.numel(), out.data_ptr())
    return out


def gsa_decode_step(q, k, v, state, new_valid=None) -> torch.Tensor:
    """One gated-slot-attention step from the raw projections q [B, Hq, 1, K], k [B, H, 1, K], v [B, H, 1, V]: the C
    step applies the softmax feature maps and pools the GLA log-gate into the state's slots itself. Packed state
    [B, H, M, K + V] (updated in place); new_valid bool [B] or None. Returns out [B, Hq, 1, V]."""
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    b, hq, _, k_dim = q.shape
    h, slots, v_dim = state.shape[1], state.shape[2], v.shape[-1]
    out = q.new_empty(b, hq, 1, v_dim)
    new_valid, valid_ptr = _valid(new_valid)
    status = _library().gsa_decode_step(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), state.data_ptr(), b, h, hq // h, k_dim, v_dim, slots, valid_ptr,
        out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError("gsa_decode_step: could not allocate its per-head buffers")
    return out

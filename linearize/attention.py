"""The linearized attention module that replaces a decoder layer's softmax attention (Liger; no new parameters).

It keeps the original module's q/k/v/o projections (and Qwen3's q/k norms) under their original names, so the
state dict is unchanged and LoRA (PEFT) attaches to them as before. From the projections' outputs, before RoPE:
  phi(q) = softmax(q) over the head dimension (scale 1);
  gla gate:   phi(k) = softmax(k),     log-gate = logsigmoid(k) / 16
  hgrn2 gate: phi(k) = 1 - sigmoid(k), log-gate = logsigmoid(k)
  S_t = diag(exp(log-gate_t)) S_{t-1} + phi(k_t)^T v_t,   o_t = phi(q_t) S_t     (one state per KV head)
  gsa gate:   phi(k) = softmax(k), slot log-gates = the gla log-gate averaged over `num_slots` groups of the head
              dimension; gated slot attention over those slots (compress.kernels.gsa; state [slots, K + V])
Liger Attention (variant hybrid) adds a sliding-window softmax branch on the RoPE'd q/k:
  o = alpha * o_recurrent + beta * o_window.
normalize (optional, not Liger's): o_recurrent = phi(q_t) S_t / phi(q_t) z_t, z_t = diag(gate_t) z_{t-1} + phi(k_t):
a weighted mean of values at the scale of a softmax output (Liger's unnormalized sum grows with the gates' memory).
Padding (from the attention mask) contributes nothing: its keys/values are zeroed and its gates set to 0 (no
decay), so a left-padded row computes exactly what the unpadded row does."""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import StaticLayer

from ..attention_outputs import attentions_requested, record_as_attentions
from ..errors import UnsupportedModelError
from ..kernels.dispatch import use_triton
from ..kernels.gla import gated_linear_attention
from ..kernels.gsa import gated_slot_attention
from ..kernels.linear_decode_cpu import (gsa_decode_step, linear_decode_available, linear_decode_step,
                                         linear_decode_supported)
from ..kernels.linear_decode_triton import (gsa_decode_step_triton, gsa_triton_supported, linear_decode_step_triton,
                                            linear_decode_triton_supported)
from ..kernels.window_attention import sliding_window_attention
from .cache import LinearizedLayer
from .settings import LinearizeSettings

GLA_GATE_NORMALIZER = 16.0


def key_validity(attention_mask, num_new: int):
    """[B, T] bool: which of the T new tokens are real (not padding), or None when all are. Read from the 4D mask's
    diagonal over the new tokens (a real token always sees itself, padding never is seen), so it works whatever
    the mask's key length and for bool (sdpa) and additive float (eager) masks alike."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise UnsupportedModelError("linearized attention reads padding from a 4D attention mask; use the sdpa or "
                                    "eager attention implementation (not flex/flash) for linearized models")
    diag = attention_mask[:, 0, -num_new:, -num_new:].diagonal(dim1=-2, dim2=-1)
    valid = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
    return None if bool(valid.all()) else valid


def rotate_half_rope(rotary, head_dim: int) -> bool:
    """Whether the model's apply_rotary_pos_emb computes x cos + rotate_half(x) sin (Llama, Mistral, Qwen2, Qwen3),
    which the decoding steps (C and Triton) then apply themselves; checked on random float64 inputs, so a model whose
    RoPE differs keeps its own function."""
    gen = torch.Generator().manual_seed(0)
    x, cos, sin = (torch.randn(1, 1, 1, head_dim, generator=gen, dtype=torch.float64) for _ in range(3))
    try:
        got, _ = rotary(x, x, cos[:, 0], sin[:, 0])
    except (TypeError, RuntimeError, ValueError):
        return False
    half = head_dim // 2
    expected = x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin
    return got.shape == expected.shape and bool(torch.allclose(got, expected, rtol=1e-12, atol=1e-12))


def weights_wanted(module: nn.Module, layer, kwargs: dict) -> bool:
    """output_attentions asked for this call (compress.attention_outputs); refused (check_weights_recoverable) where
    the cache already folded earlier tokens into the state."""
    wanted = attentions_requested(kwargs)
    if wanted:
        check_weights_recoverable(module, layer)
    return wanted


def check_weights_recoverable(module: nn.Module, layer) -> None:
    """output_attentions: a linearized layer's weights exist over the tokens of this call only (the earlier ones are
    folded into its state); refused rather than dropped, which would shift every later layer's entry."""
    if layer is not None and layer.state is not None:
        raise UnsupportedModelError(
            f"output_attentions: layer {module.layer_idx} is linearized ({module.settings.variant}); the tokens "
            "before this call are folded into its recurrent state, so it has no attention weights over them. Ask "
            "for attentions on a forward pass without past tokens (no cache, or a fresh one)")


def identity_values(v: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, T, T] identity values (padding's rows zero): a layer whose output is linear in its values returns its
    attention weights (o_t = sum_s A[t, s] v_s) when given these instead."""
    b, h, t, _ = v.shape
    eye = torch.eye(t, dtype=v.dtype, device=v.device).expand(b, h, t, t)
    return eye if valid is None else eye.masked_fill(~valid[:, None, :, None], 0.0)


class LinearizedAttention(nn.Module):
    def __init__(self, original: nn.Module, settings: LinearizeSettings, layer_idx: int):
        super().__init__()
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(original, n)]
        rotary = getattr(sys.modules.get(type(original).__module__), "apply_rotary_pos_emb", None)
        if missing or rotary is None:
            raise UnsupportedModelError(f"{type(original).__name__} has no {', '.join(missing) or 'RoPE function'}: "
                                        "linearize supports Llama, Mistral, Qwen2 and Qwen3 attention")
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (original.q_proj, original.k_proj, original.v_proj,
                                                              original.o_proj)
        self.q_norm = getattr(original, "q_norm", None)  # Qwen3: RMSNorm over the head dimension, kept
        self.k_norm = getattr(original, "k_norm", None)
        self.config = original.config
        self.layer_idx = layer_idx
        self.head_dim = original.head_dim
        self.scaling = original.scaling
        self.settings = settings
        self._rotary = rotary  # the model's own apply_rotary_pos_emb (window branch only)
        # rotate_half_rope(rotary, head_dim) on first use: built under accelerate's empty-weights context (a
        # checkpoint loaded with --max-memory) its probe tensors would be meta tensors, which cannot be compared
        self._rope_is_rotate_half: bool | None = None

    def extra_repr(self) -> str:
        s = self.settings
        extra = f", window={s.window}, alpha={s.alpha}, beta={s.beta}" if s.variant == "hybrid" else ""
        extra += f", num_slots={s.num_slots}" if s.gate == "gsa" else ""
        return f"layer_idx={self.layer_idx}, variant={s.variant}, gate={s.gate}{extra}"

    def runtime_path(self, device_type: str = "cpu") -> str:
        """What a decoding step and a prompt run on a device of this type (what `compress inspect` prints)."""
        s = self.settings
        label = {"gla": "GLA", "hybrid": "Liger Attention (recurrence + window)", "mom": "Mixture-of-Memories"}[
            s.variant]
        label += f", gate {s.gate}" if s.gate != "gla" else ""
        if s.gate == "gsa" and s.variant == "hybrid":
            step = "the torch recurrence a token (the window branch is fused for the GLA gates only)"
        elif self._float64():
            step = "the torch recurrence a token (the fused steps compute in float32)"
        elif device_type == "cuda":
            step = ("one Triton step a token where Triton is installed and the head and value sizes are powers of "
                    "two of at least 16 (the torch recurrence otherwise)")
        elif linear_decode_available():
            step = "one C call a token (csrc/linear_decode.c; the torch recurrence where gradients are on)"
        else:
            step = "the torch recurrence a token (no C kernels: COMPRESS_CPU_KERNELS=off or no compiler)"
        return f"linearized, {label}: decoding {step}; prompts {self._prompt_path(device_type)}"

    def _prompt_path(self, device_type: str) -> str:
        return "the chunked torch path"

    def _float64(self) -> bool:
        """A float64 model: its states are float64, which the fused (float32) steps do not take."""
        return any(p.dtype == torch.float64 for p in self.parameters())

    def _cache_layer(self, cache) -> LinearizedLayer | None:
        if cache is None:
            return None
        i = self.layer_idx
        while len(cache.layers) <= i:  # caches that create their layers lazily
            if cache.layer_class_to_replicate is None:
                raise UnsupportedModelError(f"the cache has no layer {i}")
            cache.layers.append(cache.layer_class_to_replicate())
        layer = cache.layers[i]
        if not isinstance(layer, LinearizedLayer):
            if isinstance(layer, StaticLayer):  # its masks span max_cache_len: padding would be read off the wrong
                # columns, and a swapped layer's length would disagree with the softmax layers' (wrong tokens)
                raise UnsupportedModelError(
                    "linearized layers keep a recurrent state and do not work with a static cache "
                    "(cache_implementation='static' / StaticCache); use the default cache or a LinearizedCache")
            if layer.get_seq_length() > 0:
                raise UnsupportedModelError(f"cache layer {i} already holds keys/values of softmax attention; a "
                                            "linearized layer needs a fresh cache (or a LinearizedCache)")
            layer = cache.layers[i] = LinearizedLayer(self.settings.window_or_none())
        return layer

    def state_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of this layer's recurrent state in the cache: one [K, V] matrix per KV head."""
        kv_heads = self.k_proj.out_features // self.head_dim
        if self.settings.gate == "gsa":  # slot keys and slot values, packed
            return batch, kv_heads, self.settings.num_slots, 2 * self.head_dim
        return batch, kv_heads, self.head_dim, self.head_dim + int(self.settings.normalize)

    def cache_bytes(self, batch: int = 1) -> int:
        """Bytes this layer's cache holds at any context length: the state, float32 (the kernels' accumulation
        dtype) or wider (a float64 model's), plus, for the hybrid, the ring buffer of `window - 1` keys and values in
        that dtype and their validity."""
        item = 8 if self._float64() else 4  # (LinearizedLayer.store: float32 or wider)
        n = item * math.prod(self.state_shape(batch))
        window = self.settings.window_or_none()
        if window:
            kv_heads = self.k_proj.out_features // self.head_dim
            n += batch * (window - 1) * (2 * item * kv_heads * self.head_dim + 1)
        return n

    def project(self, hidden_states):
        """q [B, Hq, T, D], k and v [B, Hkv, T, D]: the original projections (+ biases, + q/k norms), before RoPE."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k = self.q_proj(hidden_states).view(shape), self.k_proj(hidden_states).view(shape)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), self.v_proj(hidden_states).view(shape).transpose(1, 2)

    def features(self, q, k):
        """(phi(q), phi(k), log-gates) from the projections."""
        if self.settings.gate == "hgrn2":
            return q.softmax(-1), torch.sigmoid(-k), F.logsigmoid(k)
        log_gate = F.logsigmoid(k) / GLA_GATE_NORMALIZER
        if self.settings.gate == "gsa":  # [.., K] -> [.., num_slots]: mean over contiguous groups of dimensions
            shape = log_gate.shape
            log_gate = F.adaptive_avg_pool1d(log_gate.reshape(-1, 1, shape[-1]), self.settings.num_slots)
            log_gate = log_gate.view(*shape[:-1], self.settings.num_slots)
        return q.softmax(-1), k.softmax(-1), log_gate

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.get("past_key_values")
        b, t, _ = hidden_states.shape
        layer = self._cache_layer(cache)
        want_weights = weights_wanted(self, layer, kwargs)
        q, k, v = self.project(hidden_states)
        valid = key_validity(attention_mask, t)
        fused = self._fused_decode_ready(layer) if t == 1 and not want_weights else None
        if fused:
            return self._fused_decode_step(fused, layer, q, k, v, valid, position_embeddings, hidden_states)
        phi_q, phi_k, log_gate = self.features(q, k)
        window = self.settings.window_or_none()
        state = layer.state if layer is not None else None
        # (one token sees every slot of the ring buffer: their order does not matter)
        past = layer.window_past(ordered=t > 1) if layer is not None and window is not None else None
        out, state, window_kv = self._mix(phi_q, phi_k, v, log_gate, valid, q, k, position_embeddings, state, past)
        if layer is not None:
            layer.store(state, *window_kv, new_tokens=t)
        weights = None
        if want_weights:  # the output is linear in the values: with the identity as values it is the weights
            weights = self._mix(phi_q, phi_k, identity_values(v), log_gate, valid, q, k, position_embeddings)[0]
            record_as_attentions(weights)
        out = out.transpose(1, 2).reshape(b, t, -1).to(hidden_states.dtype)
        return self.o_proj(out), weights

    def _mix(self, phi_q, phi_k, v, log_gate, valid, q, k, position_embeddings, state=None, past=None):
        """(the layer's output per head [B, Hq, T, V], the recurrent state after it, the window's (keys, values,
        valid) to store: empty without a window branch) from the features, values and what the cache held."""
        # normalize: a ones column rides along with the values, so the same recurrence also carries z_t = the
        # decayed sum of phi(k) (its output column is phi(q_t) . z_t), in every kernel and in the cached state
        v_state = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if self.settings.normalize else v
        if valid is not None:
            pad = ~valid[:, None, :, None]
            phi_k, log_gate = phi_k.masked_fill(pad, 0.0), log_gate.masked_fill(pad, 0.0)
            v, v_state = v.masked_fill(pad, 0.0), v_state.masked_fill(pad, 0.0)
            k = k.masked_fill(pad, 0.0)  # the window's masked keys must not be NaN either: a fused kernel's masked
            # score can be NaN + -inf (a float64 model's all-padding rows are NaN after a softmax layer)
        recurrent = gated_slot_attention if self.settings.gate == "gsa" else gated_linear_attention
        out, state = recurrent(phi_q, phi_k, v_state, log_gate, state, self.settings.chunk_size)
        if self.settings.normalize:
            out = out[..., :-1] / out[..., -1:].clamp_min(1e-6)
        window = self.settings.window_or_none()
        if window is None:
            return out, state, ()
        b, _, t, _ = q.shape
        cos, sin = position_embeddings
        q_rot, k_rot = self._rotary(q, k, cos, sin)
        new_valid = valid if valid is not None else torch.ones(b, t, dtype=torch.bool, device=q.device)
        if past is None:
            keys, values, key_valid = k_rot, v, new_valid
        else:
            keys = torch.cat([past[0].to(k_rot.dtype), k_rot], dim=2)  # the ring buffer is float32
            values = torch.cat([past[1].to(v.dtype), v], dim=2)
            key_valid = torch.cat([past[2], new_valid], dim=1)
        windowed = sliding_window_attention(q_rot, keys, values, key_valid, window, self.scaling)
        return self.settings.alpha * out + self.settings.beta * windowed, state, (keys, values, key_valid)

    # ---- one decoding step in one call: C on the CPU (kernels/linear_decode_cpu.py), Triton on CUDA
    # (kernels/linear_decode_triton.py); forward's torch path is their reference ----
    def _fused_decode_ready(self, layer) -> str | None:
        """"triton" or "cpu" where a one-call decoding step applies to this layer's cache, else None."""
        if layer is None or layer.state is None:
            return None
        window = self.settings.window_or_none() is not None
        rings = (layer.window_keys, layer.window_values, layer.window_valid) if window else ()
        if window and layer.window_keys is None:
            return None
        if use_triton(layer.state):  # CUDA (or COMPRESS_KERNELS=triton): the Triton steps
            if self.settings.gate == "gsa":
                ok = not window and gsa_triton_supported(layer.state, self.head_dim)
            else:
                ok = linear_decode_triton_supported(layer.state, self.settings.normalize, *rings)
            return "triton" if ok else None
        if self.settings.gate == "gsa" and window:  # (the window branch is fused for the GLA gates only)
            return None
        return "cpu" if linear_decode_supported(layer.state, *rings) else None

    def _decoded(self, out, layer, hidden_states):
        """The output of a one-call decoding step out [B, Hq, 1, V], its token counted in the cache layer."""
        layer.cumulative_length += 1
        return self.o_proj(out.view(out.shape[0], 1, -1).to(hidden_states.dtype)), None

    def _fused_decode_step(self, kind, layer, q, k, v, valid, position_embeddings, hidden_states):
        """One call (C on the CPU, Triton on CUDA; same arguments) from the raw projections: the steps apply the
        feature maps, gates and, for the hybrid's window, RoPE of the rotate-half form themselves."""
        new_valid = None if valid is None else valid[:, -1]
        if self.settings.gate == "gsa":
            step = gsa_decode_step_triton if kind == "triton" else gsa_decode_step
            return self._decoded(step(q, k, v, layer.state, new_valid), layer, hidden_states)
        window = rope = None
        if self.settings.window_or_none() is not None:
            cos, sin = position_embeddings
            slot = layer.cumulative_length % layer.window_keys.shape[2]
            if self._rope_is_rotate_half is None:
                self._rope_is_rotate_half = rotate_half_rope(self._rotary, self.head_dim)
            if self._rope_is_rotate_half and cos.shape[-1] == self.head_dim:
                q_rot = k_rot = None  # the step rotates q and k itself
                rope = tuple(t.expand(q.shape[0], 1, -1) for t in (cos, sin))
            else:
                q_rot, k_rot = self._rotary(q, k, cos, sin)
            window = (q_rot, k_rot, v, layer.window_keys, layer.window_values, layer.window_valid, slot)
        step = linear_decode_step_triton if kind == "triton" else linear_decode_step
        out = step(q, k, v, layer.state, self.settings.gate, self.settings.normalize, window, new_valid,
                   self.settings.alpha, self.settings.beta, self.scaling, rope=rope)
        return self._decoded(out, layer, hidden_states)

"""Mixture-of-Memories (MoM, 2025) built from a pretrained softmax attention layer: `num_memories` gated delta-rule
memories, each token routed to `top_k` of them, plus one shared memory every token writes and reads.

What comes from the pretrained layer and what is new (a MoM layer is trained from scratch in the paper):
- queries, keys, values: the layer's own q/k/v projections (and Qwen3's q/k norms), shared by all memories. The
  memories differ by the tokens routed to them, not by their projections: memory key/value projections *are* W_K
  and W_V (no copies, so LoRA on k_proj/v_proj adapts every memory at once and the state dict keeps its names).
  phi(q) = softmax(q) over the head dimension as in Liger; keys are the Liger key features, L2-normalized (the
  delta rule's (I - beta k k^T) is a contraction only for unit keys).
- decay alpha_t: from the key projection, no new parameter: log alpha_t = mean over the head dimension of the Liger
  log-gate (logsigmoid(k) / 16 for gate gla, logsigmoid(k) for hgrn2). A scalar per head, because the delta rule's
  chunked WY form (and fla's kernel) take one decay per head and token.
- write strength beta_t: a new per-KV-head linear map (`beta_proj`, hidden -> Hkv), zero weights and zero bias, so
  beta = 0.5 for every token at conversion. Softmax attention has nothing that plays this role, so a constant start
  keeps the conversion deterministic; the map is tiny (hidden * Hkv + Hkv) and learns in recovery.
- router: a new linear map hidden -> num_memories (`router`, no bias), normal(0, 0.02) from a seed per layer: near
  uniform routing at conversion, trained in recovery with the switch-style load-balancing loss (`aux_loss`).

Output: o_t = (o_shared + sum_{m in top-k} w_m o_m) / 2, with w the router's probabilities renormalized over the
chosen memories, so the two halves weigh like the hybrid's 0.5 / 0.5 (`shared_memory: false`: the routed mixture
alone; with num_memories 1 that is one gated delta-rule memory, GLA's state size). A memory a token is not routed
to sees an identity step (k = decay = beta = 0), so in training each routed memory runs over only its own tokens,
gathered in order (`routed_delta_rule`): ~(k + 1)x the work of a single memory, not (M + 1)x. Without gradients on
the CPU (a prompt, an evaluation) the C decoding step runs token after token instead (`_prompt_in_c`).

Cache: a `LinearizedLayer` whose state is [B, M + 1, Hkv, K, V] (M without the shared memory): constant in context
length."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention_outputs import record_as_attentions
from ..kernels.delta_rule import gated_delta_rule
from ..kernels.dispatch import use_triton
from ..kernels.linear_decode_cpu import linear_decode_available, linear_decode_supported, mom_decode_step
from ..kernels.linear_decode_triton import mom_decode_step_triton, mom_triton_supported
from ..errors import UnsupportedModelError
from ..targets import EXEMPT
from .attention import LinearizedAttention, identity_values, key_validity, weights_wanted
from .settings import LinearizeSettings

ROUTER_INIT_STD = 0.02
SHARED_MIX_SCALE = 0.5  # with a shared memory: (shared + routed mixture) / 2
NEW_MODULES = ("router", "beta_proj")
# gather each memory's tokens only while the busiest memory holds at most this share of them (measured: the
# gathering saves 24-38% of the memories' time at balanced top-2 of 4, and costs 22-43% when one memory takes all)
GATHER_MAX_FRACTION = 0.75


def top_k_routing(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [.., M]: the router's probabilities renormalized over the chosen memories, 0 elsewhere;
    chosen [.., M] bool)."""
    probs = logits.softmax(-1)
    top, index = probs.topk(top_k, dim=-1)
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, index, True)
    weights = torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))
    return weights, chosen


def load_balance_loss(logits: torch.Tensor, chosen: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Switch-Transformer auxiliary loss M * sum_m f_m * P_m over the real tokens: f_m the fraction of routing slots
    given to memory m (not differentiable), P_m its mean router probability (differentiable). 1 when balanced."""
    probs = logits.softmax(-1)
    weight = torch.ones_like(probs[..., :1]) if valid is None else valid.unsqueeze(-1).to(probs.dtype)
    tokens = weight.sum().clamp_min(1.0)
    slots = chosen.to(probs.dtype) / chosen.sum(-1, keepdim=True)  # each token's top_k slots, 1 / top_k each
    fraction = (slots * weight).sum((0, 1)) / tokens
    mean_prob = (probs * weight).sum((0, 1)) / tokens
    return logits.shape[-1] * (fraction * mean_prob).sum()


def routed_delta_rule(q, k, v, g, beta, routed, weights, state, chunk_size):
    """The routed memories' mixture sum_m weights_m o_m [B, Hq, T, V] and their states [B, M, Hkv, K, V], each memory
    over the tokens routed to it. q [B, Hq, T, K], k / v [B, Hkv, T, .], g / beta [B, Hkv, T], routed [B, T, M]
    bool, weights [B, T, M] (0 where not routed), state [B, M, Hkv, K, V] or None. Where it saves work, a memory's
    tokens are gathered in order into one sequence (padded to the busiest memory's count with identity steps): the
    same recurrence as identity steps at the other tokens, for ~top_k / M of the work. When routing is so uneven
    that the busiest memory holds most tokens, every memory runs over every token, with identity steps where it is
    not routed (the gathering would only cost)."""
    b, t, m = routed.shape
    active = routed.transpose(1, 2)  # [B, M, T]
    counts = active.sum(-1)
    length = max(int(counts.max()), 1)
    init = None if state is None else state.flatten(0, 1)

    def per_memory(x):  # [B, H, T, ...] -> [B, M, H, T, ...]
        return x.unsqueeze(1).expand(b, m, *x.shape[1:])

    if length > GATHER_MAX_FRACTION * t:
        on = active.unsqueeze(2).to(g.dtype)  # [B, M, 1, T]
        out, state = gated_delta_rule(*(per_memory(x).flatten(0, 1) for x in (q, k, v)), (g.unsqueeze(1) * on).flatten(
            0, 1), (beta.unsqueeze(1) * on).flatten(0, 1), init, chunk_size)
        mix = weights.transpose(1, 2)[:, :, None, :, None].to(out.dtype)  # [B, M, 1, T, 1]
        return (out.view(b, m, *out.shape[1:]) * mix).sum(1), state.view(b, m, *state.shape[1:])
    # each memory's tokens first, in order (a stable sort of "not routed"); the rest of the row is padding
    order = torch.sort((~active).to(torch.uint8), dim=-1, stable=True).indices[..., :length]  # [B, M, L]
    real = torch.arange(length, device=routed.device) < counts.unsqueeze(-1)  # [B, M, L]

    def gather(x):  # [B, H, T, ...] -> [B * M, H, L, ...], padding zeroed
        index = order[:, :, None, :].expand(b, m, x.shape[1], length)
        mask = real[:, :, None, :]
        if x.dim() == 4:
            index, mask = index.unsqueeze(-1).expand(*index.shape, x.shape[-1]), mask.unsqueeze(-1)
        return (per_memory(x).gather(3, index) * mask.to(x.dtype)).flatten(0, 1)

    out, state = gated_delta_rule(*(gather(x) for x in (q, k, v, g, beta)), init, chunk_size)
    hq, dv = out.shape[1], out.shape[-1]
    mix = weights.transpose(1, 2).gather(2, order) * real  # [B, M, L]: each gathered token's weight, 0 on padding
    out = (out.view(b, m, hq, length, dv) * mix[:, :, None, :, None].to(out.dtype)).transpose(1, 2)
    index = order.reshape(b, 1, m * length, 1).expand(b, hq, m * length, dv)  # back to its token, summed over memories
    mixed = out.new_zeros(b, hq, t, dv).scatter_add(2, index, out.reshape(b, hq, m * length, dv))
    return mixed, state.view(b, m, *state.shape[1:])


def _float_tensor(module: nn.Module) -> torch.Tensor:
    """A floating-point parameter (else buffer) of `module`: the device, dtype and trainability new modules beside
    it take."""
    tensors = [*module.parameters(), *module.buffers()]
    found = next((t for t in tensors if t.is_floating_point()), None)
    if found is None:
        raise UnsupportedModelError(f"{type(module).__name__} holds no floating-point tensor to take a dtype from")
    return found


class Float32Router(nn.Linear):
    """The router: a Linear (same tensors, so checkpoints and `targets` see a Linear) whose logits are computed in
    float32 (a stable top-k). Called as a module, never through its `.weight` from the attention's forward: layers
    left on disk (--max-memory) load a submodule's tensors only when that submodule is called, and a weight read
    directly was a meta tensor there (the routing read garbage)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class MixtureOfMemoriesAttention(LinearizedAttention):
    def __init__(self, original: nn.Module, settings: LinearizeSettings, layer_idx: int):
        super().__init__(original, settings, layer_idx)
        w = _float_tensor(self.k_proj)  # k_proj may be pruned (packed values) or quantized (codes and scales)
        hidden, kv_heads = self.k_proj.in_features, self.k_proj.out_features // self.head_dim
        self.router = Float32Router(hidden, settings.num_memories, bias=False, device=w.device, dtype=w.dtype)
        self.beta_proj = nn.Linear(hidden, kv_heads, bias=True, device=w.device, dtype=w.dtype)
        self.aux_loss: torch.Tensor | None = None  # set by a training forward, read (and cleared) by recover
        reasons = ("Mixture-of-Memories' router, read in float32 every step", "Mixture-of-Memories' write strengths")
        for child, reason in zip((self.router, self.beta_proj), reasons):
            child.requires_grad_(w.requires_grad)  # trainable like the rest of the model (frozen after load)
            setattr(child, EXEMPT, f"{reason}; small, and recover's train_modules trains it")
        self._init_new_parameters()

    @torch.no_grad()
    def _init_new_parameters(self) -> None:
        if self.router.weight.device.type == "meta":  # a checkpoint being loaded: its weights come next
            return
        gen = torch.Generator().manual_seed(1000 + self.layer_idx)
        router = torch.randn(self.router.weight.shape, generator=gen) * ROUTER_INIT_STD
        self.router.weight.copy_(router.to(self.router.weight.dtype))
        self.beta_proj.weight.zero_()
        self.beta_proj.bias.zero_()  # beta = sigmoid(0) = 0.5

    def extra_repr(self) -> str:
        s = self.settings
        shared = "+1" if s.shared_memory else ""
        return (f"layer_idx={self.layer_idx}, variant=mom, gate={s.gate}, memories={s.num_memories}{shared}, "
                f"top_k={s.top_k}")

    @property
    def _mix_scale(self) -> float:
        return SHARED_MIX_SCALE if self.settings.shared_memory else 1.0

    @property
    def memories(self) -> int:
        """Memories in the state: the routed ones, after the shared one (index 0) when there is one."""
        return self.settings.num_memories + int(self.settings.shared_memory)

    def _fused_decode_ready(self, layer) -> str | None:
        """"triton" or "cpu" where a one-call decoding step applies to this layer's cache, else None."""
        if layer is None or layer.state is None:
            return None
        if use_triton(layer.state):
            return "triton" if mom_triton_supported(layer.state) else None
        return "cpu" if linear_decode_supported(layer.state) else None

    def _prompt_path(self, device_type: str) -> str:
        if device_type == "cuda" or not linear_decode_available() or self._float64():
            return "the chunked torch path"
        return "the C step token after token (the chunked torch path where gradients are on)"

    def _prompt_in_c(self, layer, q) -> str | None:
        """"cpu" where a prompt (gradients off, CPU) goes through the C step token after token: one pass over the
        state per token and memory; one layer at 1k tokens 52 -> 27 ms against the chunked WY path, whose gathering
        and small-matrix products cost more than the arithmetic. The chunked path keeps training (gradients). (The
        same through linear_decode_step was measured for GLA and the hybrid: no faster at 1k, slower at 4k.)"""
        if q.device.type != "cpu" or q.dtype == torch.float64 or use_triton(q):  # (the C step computes in float32)
            return None
        state = layer.state if layer is not None and layer.state is not None else torch.empty(0)
        return "cpu" if linear_decode_supported(state) else None

    def state_shape(self, batch: int) -> tuple[int, ...]:
        b, *per_memory = super().state_shape(batch)
        return b, self.memories, *per_memory

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.get("past_key_values")
        b, t, _ = hidden_states.shape
        layer = self._cache_layer(cache)
        want_weights = weights_wanted(self, layer, kwargs)
        q, k, v = self.project(hidden_states)
        valid = key_validity(attention_mask, t)
        beta_logit = self.beta_proj(hidden_states)  # [B, T, Hkv]
        logits = self.router(hidden_states)  # float32 [B, T, M]
        fused = None if want_weights else self._fused_decode_ready(layer) if t == 1 else self._prompt_in_c(layer, q)
        if fused:  # one C call / Triton launch: features, routing and the memories' steps
            self.aux_loss = None
            s = self.settings
            step = mom_decode_step_triton if fused == "triton" else mom_decode_step
            fresh = layer is None or layer.state is None
            state = q.new_zeros(self.state_shape(b), dtype=torch.float32) if fresh else layer.state
            out = step(q, k, v, beta_logit, logits, state, s.gate, s.top_k, s.shared_memory,
                       None if valid is None else valid[:, -1] if t == 1 else valid, self._mix_scale)
            if layer is not None and fresh:
                layer.store(state, new_tokens=t)
            elif layer is not None:
                layer.cumulative_length += t
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1).to(hidden_states.dtype)), None
        phi_q, phi_k, log_gate = self.features(q, k)
        phi_k, log_gate = F.normalize(phi_k, dim=-1), log_gate.mean(-1)  # unit keys, one decay per head
        beta = torch.sigmoid(beta_logit).transpose(1, 2).to(phi_k.dtype)  # [B, Hkv, T]
        weights, chosen = top_k_routing(logits, self.settings.top_k)  # [B, T, M]
        if valid is not None:  # padding: an identity step in every memory
            pad = ~valid[:, None, :]
            phi_k, v = phi_k.masked_fill(pad[..., None], 0.0), v.masked_fill(pad[..., None], 0.0)
            log_gate, beta = log_gate.masked_fill(pad, 0.0), beta.masked_fill(pad, 0.0)
        self.aux_loss = (load_balance_loss(logits, chosen, valid)
                         if self.training and torch.is_grad_enabled() else None)
        state = layer.state if layer is not None and layer.state is not None else None
        out, state_after = self._memories(phi_q, phi_k, v, log_gate, beta, chosen, weights, state)
        if layer is not None:
            layer.store(state_after, new_tokens=t)
        attention = None
        if want_weights:  # the output is linear in the values: with the identity as values it is the weights
            attention = self._memories(phi_q, phi_k, identity_values(v, valid), log_gate, beta, chosen,
                                       weights)[0]
            record_as_attentions(attention)
        out = out.transpose(1, 2).reshape(b, t, -1).to(hidden_states.dtype)
        return self.o_proj(out), attention

    def _memories(self, phi_q, phi_k, v, log_gate, beta, chosen, weights, state=None):
        """(the routed memories' output per head [B, Hq, T, V] (+ the shared memory's), the state after them)."""
        # (a padding token is routed as any other and reads its memories, as the decoding steps do; it writes nothing)
        out, state_after = routed_delta_rule(phi_q, phi_k, v, log_gate, beta, chosen, weights,
                                             None if state is None else state[:, -self.settings.num_memories:],
                                             self.settings.chunk_size)
        if self.settings.shared_memory:  # every token, the whole sequence, weight 1
            shared_out, shared_state = gated_delta_rule(phi_q, phi_k, v, log_gate, beta,
                                                        None if state is None else state[:, 0],
                                                        self.settings.chunk_size)
            out = out + shared_out
            state_after = torch.cat([shared_state.unsqueeze(1), state_after], 1)
        return out * self._mix_scale, state_after


@torch.no_grad()
def round_new_parameters(model: nn.Module, names: list[str], dtype: torch.dtype) -> None:
    """Round the router / beta map of the named MoM modules to the checkpoint's storage dtype in place, so the model
    in memory computes exactly what its saved checkpoint will (the pretrained weights already are)."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, MixtureOfMemoriesAttention):
            for p in (p for child in NEW_MODULES for p in getattr(module, child).parameters()):
                p.copy_(p.to(dtype).to(p.dtype))


def attention_class(settings: LinearizeSettings) -> type[LinearizedAttention]:
    return MixtureOfMemoriesAttention if settings.variant == "mom" else LinearizedAttention

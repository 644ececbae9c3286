"""The cache of a linearized layer: its recurrent state (constant size) and, for the Liger Attention hybrid, a ring
buffer of the window's last `window - 1` keys/values (RoPE applied) with their validity.

`LinearizedLayer` is a transformers `CacheLayerMixin`, not a `LinearAttentionLayer`: transformers' linear-attention
layers are not CacheLayerMixins, so a model whose every layer is linear would have no layer to report the sequence
length (the model's positions come from `cache.get_seq_length()`), and their sliding-window layers keep no per-token
validity (left padding inside the window). The mask sizes reported are those of a full-attention layer, so a model
mixing linearized and softmax layers builds one consistent mask.

`LinearizedCache(model)` holds a `LinearizedLayer` for each linearized layer and transformers' own layer for the
others (a DynamicLayer, or its sliding-window layer where the attention slides).
Any other dynamic transformers cache works too (the default `DynamicCache` of `generate`, a GEARCache): a linearized
layer swaps its own slot for a `LinearizedLayer` on first use (attention.py). A static cache is refused (its masks
span max_cache_len, which the padding read-out and the softmax layers' lengths would disagree with)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import CompressError
from ..pass_api import storage_bytes


class LinearizedLayer(CacheLayerMixin):
    is_sliding = False
    is_croppable = False  # a recurrent state cannot be rolled back
    supports_early_init = False

    def __init__(self, window: int | None = None):
        super().__init__()
        self.window = window  # None: no window branch
        self.state = None  # [B, Hkv, K, V], float32 or wider (as the kernels return it)
        self.window_keys = self.window_values = self.window_valid = None  # [B, Hkv, W - 1, D], [B, W - 1]
        self.cumulative_length = 0

    # ---- what the linearized attention reads and writes ----------------------------------------------------------
    def window_past(self, ordered: bool = True):
        """(keys, values, valid) of the last `window - 1` tokens, oldest first (`ordered`) or in slot order (enough
        for one new token, which sees every slot: saves three copies per decoding step); never-written slots are
        invalid."""
        if self.window_keys is None:
            return None
        if not ordered:
            return self.window_keys, self.window_values, self.window_valid
        shift = -(self.cumulative_length % self.window_keys.shape[2])
        return (self.window_keys.roll(shift, dims=2), self.window_values.roll(shift, dims=2),
                self.window_valid.roll(shift, dims=1))

    def store(self, state, keys=None, values=None, valid=None, new_tokens: int = 0):
        """Keep the state after this call; `keys/values/valid` are [past window | new tokens] (window layers)."""
        self.is_initialized = True
        self.state = state.detach().contiguous()  # the fused CPU decode step updates it in place
        if keys is not None:
            slots = self.window - 1
            # the ring buffer is float32 or wider like the state (64 tokens; the fused CPU step reads float32)
            dtype = torch.promote_types(keys.dtype, torch.float32)
            if self.window_keys is None:
                b, h, _, d = keys.shape
                self.window_keys = keys.new_zeros(b, h, slots, d, dtype=dtype)
                self.window_values = values.new_zeros(b, h, slots, values.shape[-1], dtype=dtype)
                self.window_valid = valid.new_zeros(b, slots)
            end = self.cumulative_length + new_tokens
            if new_tokens == 1:  # decoding: overwrite the oldest slot in place
                if self.window_keys.is_inference() and not torch.is_inference_mode_enabled():
                    # (a prompt run under torch.inference_mode(), decoded outside it: such tensors refuse in-place
                    # writes there; the C step writes their memory directly and needs no copy)
                    self.window_keys, self.window_values, self.window_valid = (
                        t.clone() for t in (self.window_keys, self.window_values, self.window_valid))
                i = self.cumulative_length % slots
                self.window_keys[:, :, i] = keys[:, :, -1].detach()
                self.window_values[:, :, i] = values[:, :, -1].detach()
                self.window_valid[:, i] = valid[:, -1]
            else:  # the last `slots` entries, placed so that token p sits at slot p % slots
                short = slots - keys.shape[2]
                if short > 0:  # fewer tokens than slots so far: the missing oldest ones are invalid
                    keys, values = (F.pad(x, (0, 0, short, 0)) for x in (keys, values))
                    valid = F.pad(valid, (short, 0), value=False)
                shift = end % slots
                self.window_keys = keys[:, :, -slots:].detach().roll(shift, dims=2).to(dtype).contiguous()
                self.window_values = values[:, :, -slots:].detach().roll(shift, dims=2).to(dtype).contiguous()
                self.window_valid = valid[:, -slots:].roll(shift, dims=1).contiguous()
        self.cumulative_length += new_tokens

    # ---- transformers API ------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a linearized layer keeps a recurrent state, not keys/values: its attention module (not "
                        "cache.update) writes it")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = self.window_keys = self.window_values = self.window_valid = None
        self.cumulative_length = 0
        self.is_initialized = False

    def offload(self):  # constant-size state: nothing worth offloading
        pass

    def prefetch(self):
        pass

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise RuntimeError("a linearized layer's recurrent state cannot be cropped (no assisted/speculative "
                               "decoding with linearized layers)")

    def _each(self, fn) -> None:
        for name in ("state", "window_keys", "window_values", "window_valid"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._each(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each(lambda t: t.repeat_interleave(repeats, dim=0))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.state, self.window_keys, self.window_values, self.window_valid) if t is not None]


def linearized_windows(model) -> dict[int, int | None]:
    """{layer index: window (None: no window branch)} of the model's linearized attention modules."""
    from .attention import LinearizedAttention

    return {m.layer_idx: m.settings.window_or_none() for m in model.modules() if isinstance(m, LinearizedAttention)}


class LinearizedCache(Cache):
    """A transformers Cache for a (partly) linearized model: recurrent layers where the model is linearized, a
    DynamicLayer (growing K/V) elsewhere, or transformers' sliding-window layer where the attention slides."""

    def __init__(self, model):
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise CompressError(f"LinearizedCache takes the linearized model itself, got {type(model).__name__}")
        from ..kvcache.cache import sliding_windows, uncompressed_layer

        windows, sliding = linearized_windows(model), sliding_windows(model.config)
        num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[LinearizedLayer(windows[i]) if i in windows else uncompressed_layer(i, sliding)
                                 for i in range(num_layers)])

    def nbytes(self) -> dict[str, int]:
        return cache_nbytes(self)


def cache_nbytes(cache: Cache) -> dict[str, int]:
    """Bytes held by any cache: `recurrent` (states and windows of linearized layers), `kv` (K/V of other layers
    that expose keys/values), `total`."""
    recurrent, kv = [], []
    for layer in cache.layers:
        if isinstance(layer, LinearizedLayer):
            recurrent += layer.tensors()
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            kv += [layer.keys, layer.values]
    return {"recurrent": storage_bytes(recurrent), "kv": storage_bytes(kv), "total": storage_bytes(recurrent + kv)}

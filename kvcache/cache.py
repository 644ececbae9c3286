"""GEAR and KIVI caches for transformers 5.x: `model.generate(..., cache=GEARCache(model.config, bits=4))`.

Each attention layer keeps the most recent tokens (fewer than `residual_length`) in an fp16 window; when the window
fills, those `residual_length` tokens are compressed as one chunk and appended to an append-only store (store.py),
so the work per token is constant and old chunks never drift. The window is float16 whatever the model's dtype: a
float32 model's recent tokens are rounded to float16 too (part of what the cache costs against a DynamicCache).

What `update` hands to attention: the tokens of the current call are always seen exactly; earlier tokens are seen as
stored (compressed chunks + fp16 window). How:
- with the model's attention implementation set to "gear_kv" (`compress.kvcache.use_compressed_attention(model)`),
  `update` returns only the window and the new tokens, tagged with a snapshot of the compressed past, and the
  registered attention (attention.py) reads codes, scales, outliers and low-rank factors directly, with no dense
  copy of the past;
- with any other attention implementation (sdpa, eager), `update` returns the dense reconstruction (correct, slower,
  like transformers' QuantizedCache)."""
from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import CompressError, ConfigError
from ..pass_api import storage_bytes
from .config import KVCacheSettings
from .kernel_api import KEY_AXIS, VALUE_AXIS
from .store import CompressedStore

ATTENTION_NAME = "gear_kv"
WINDOW_DTYPE = torch.float16
FP16_MAX = torch.finfo(torch.float16).max
ITEMS = ("codes", "scales_zeros", "lowrank", "outlier_values", "outlier_indices", "window")


def tag_past(tensor: torch.Tensor, past: CompressedStore) -> torch.Tensor:
    """Attach the compressed past to the tensor that attention receives (read back by attention.py)."""
    tensor._gear_past = past
    return tensor


@functools.lru_cache(maxsize=1)
def _warn_dense_path() -> None:
    warnings.warn("GEARCache: the model's attention is not 'gear_kv', so each step dequantizes the whole compressed "
                  "past; call compress.kvcache.use_compressed_attention(model) to read the packed storage directly",
                  stacklevel=3)


def _check_fp16_range(keys: torch.Tensor, values: torch.Tensor, layer_idx: int | None = None) -> None:
    """The window, scales, zero points and outliers are float16: keys or values beyond its range (65504) would be
    stored as inf and every later attention score NaN. A clear error instead."""
    if not keys.numel():
        return
    for x in (keys, values):
        largest = float(x.detach().abs().amax())
        if largest <= FP16_MAX:
            continue  # (NaN compares false: refused too)
        where = "this model's attention" if layer_idx is None else f"layer {layer_idx}'s attention"
        fix = "those layers" if layer_idx is None else f"layer {layer_idx} (and any other that does)"
        raise CompressError(f"gear_kv: {where} keys/values reach {largest:.4g}, beyond float16's range "
                            f"({FP16_MAX:.0f}) in which the cache stores its window and scales; keep {fix} "
                            "uncompressed (skip_layers) or use another cache")


def _checks_every_call(device: torch.device) -> bool:
    """Whether every call's keys/values are checked against float16's range (where a check costs no sync)."""
    return device.type == "cpu"


class GEARLayer(CacheLayerMixin):
    """One attention layer's GEAR cache (quantized codes + sparse outliers + low-rank error + fp16 window).

    `sliding_window` (a layer whose attention slides, e.g. Mistral's): its pages span at most half the window, and
    whole pages that fall out of the window are dropped, so the layer holds at most the window + one page + the fp16
    window; `get_mask_sizes` reports what it holds and the tokens dropped (the offset), from which transformers
    builds the sliding mask."""

    is_croppable = True  # crop into compressed chunks restores their reconstruction (see `crop`)

    def __init__(self, settings: KVCacheSettings, reads_storage=lambda: False, sliding_window: int | None = None,
                 layer_idx: int | None = None):
        super().__init__()
        self.settings = settings
        self.reads_storage = reads_storage  # whether attention reads the compressed storage (else: dense return)
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.layer_idx = layer_idx  # named in errors
        self.key_store = self.value_store = None
        self.window_keys = self.window_values = None
        self.evicted = 0  # tokens dropped from the front (sliding layers)
        # transformers sets this (activate_past_recording) before assisted decoding and resets it after: crop may
        # then roll back tokens, so nothing is dropped until the crop that follows each verification
        self.record_past = False
        self._prompt_seen = False

    # ---- transformers API -------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        s = self.settings
        self.device, self.dtype = key_states.device, key_states.dtype
        head_dim = key_states.shape[-1]
        s.check_against_model(head_dim)
        page_chunks = s.page_chunks
        if self.sliding_window is not None:  # pages of at most half the window: a page leaves it whole, so the
            # layer holds at most the window + a page + the fp16 window (1.5x the window and a chunk at worst)
            page_chunks = max(1, min(page_chunks, self.sliding_window // (2 * s.residual_length)))
        common = dict(group_size=s.group_size, chunk_len=s.residual_length,
                      outlier_ratio=s.outlier_ratio, power_iters=s.power_iters, page_chunks=page_chunks,
                      factor_dtype=getattr(torch, s.lowrank_dtype), scale_format=s.scale_format)
        self.key_store = CompressedStore(axis=KEY_AXIS, bits=s.bits_of("key"), **common)
        self.value_store = CompressedStore(axis=VALUE_AXIS, bits=s.bits_of("value"), **common)
        b, h, _, d = key_states.shape
        self.window_keys = key_states.new_zeros(b, h, 0, d, dtype=WINDOW_DTYPE)
        self.window_values = value_states.new_zeros(b, h, 0, value_states.shape[-1], dtype=WINDOW_DTYPE)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        dtype = key_states.dtype
        old_wk, old_wv = self.window_keys, self.window_values
        recent_k = torch.cat([old_wk.to(dtype), key_states], dim=-2)
        recent_v = torch.cat([old_wv.to(dtype), value_states], dim=-2)
        if self.key_store.num_tokens == 0:
            out_k, out_v = recent_k, recent_v
        elif self.reads_storage():
            out_k = tag_past(recent_k, self.key_store.snapshot())
            out_v = tag_past(recent_v, self.value_store.snapshot())
        else:
            _warn_dense_path()
            out_k = torch.cat([self.key_store.dequantize().to(dtype), recent_k], dim=-2)
            out_v = torch.cat([self.value_store.dequantize().to(dtype), recent_v], dim=-2)
        self._store(recent_k, recent_v)
        return out_k, out_v

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append the window + new tokens: whole chunks are compressed, the remainder stays in the fp16 window."""
        c = self.settings.residual_length
        full = (keys.shape[-2] // c) * c
        if not self._prompt_seen or _checks_every_call(keys.device):
            held = self.window_keys.shape[-2]  # `keys` starts with the window, whose tokens were checked on arrival
            _check_fp16_range(keys[:, :, held:], values[:, :, held:], self.layer_idx)
        elif full:  # on an accelerator a check is a sync: once per compressed chunk, not per decoded token, so a
            # token past float16's range is reported at the latest when it leaves the window (its chunk is checked)
            _check_fp16_range(keys[:, :, :full], values[:, :, :full], self.layer_idx)
        if full:
            prefill = not self._prompt_seen
            self.key_store.append(keys[:, :, :full], self.settings.rank("key", prefill))
            self.value_store.append(values[:, :, :full], self.settings.rank("value", prefill))
        self._prompt_seen = True
        # a copy, so the window never shares (and keeps alive) the storage of the tensors handed to attention
        self.window_keys = keys[:, :, full:].to(WINDOW_DTYPE, copy=True)
        self.window_values = values[:, :, full:].to(WINDOW_DTYPE, copy=True)
        if not self.record_past:
            self._drop_out_of_window()

    def _drop_out_of_window(self) -> None:
        """Sliding layers: the next token sees the last sliding_window - 1 of those before it; older whole pages go
        (keys and values hold the same chunks in the same pages, so both drop alike)."""
        if self.sliding_window is None or not self.is_initialized:
            return
        oldest_needed = self.get_seq_length() - (self.sliding_window - 1)
        dropped = self.key_store.drop_pages_before(oldest_needed - self.evicted)
        assert self.value_store.drop_pages_before(oldest_needed - self.evicted) == dropped
        self.evicted += dropped

    def activate_past_recording(self, **kwargs) -> None:
        # (transformers >= 5.25 passes recurrent_states_to_keep, which concerns linear-attention layers only)
        self.record_past = True

    def held_length(self) -> int:
        """Tokens the layer holds (compressed + fp16 window): all of them, less what a sliding window dropped."""
        if not self.is_initialized:
            return 0
        return self.key_store.num_tokens + self.window_keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.held_length() + query_length, self.evicted

    def get_seq_length(self) -> int:
        return self.evicted + self.held_length()

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def reset(self) -> None:
        self.key_store = self.value_store = self.window_keys = self.window_values = None
        self.is_initialized = False
        self._prompt_seen = False
        self.evicted = 0
        self.record_past = False

    def offload(self):  # the compressed cache stays where it is
        pass

    def prefetch(self):
        pass

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (negative, as in DynamicLayer). Tokens of a compressed chunk that
        survive the crop return to the fp16 window as their reconstruction (lossy for them; exact elsewhere)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number: the count of tokens to remove from the end")
        remove = -tokens_to_remove
        if not self.is_initialized:
            return
        if remove == 0:
            self._drop_out_of_window()  # (transformers' sliding layer restricts itself to its window on crop(0) too)
            return
        needed_from = max(self.get_seq_length() - remove - self.sliding_window + 1, 0) if self.evicted else 0
        if self.evicted > needed_from:  # (only a sliding layer drops tokens)
            raise ValueError(f"crop: this sliding-window layer dropped its first {self.evicted} tokens, and after "
                             f"removing {remove} the next token needs those from {needed_from} on (call "
                             "activate_past_recording() before the steps a crop may roll back)")
        keep = max(self.held_length() - remove, 0)
        c, n_comp = self.settings.residual_length, self.key_store.num_tokens
        if keep < n_comp:
            pop = (n_comp - keep + c - 1) // c
            tail_k = self.key_store.pop_chunks(pop).to(WINDOW_DTYPE)
            tail_v = self.value_store.pop_chunks(pop).to(WINDOW_DTYPE)
            self.window_keys = torch.cat([tail_k, self.window_keys], dim=-2)
            self.window_values = torch.cat([tail_v, self.window_values], dim=-2)
        start = self.key_store.num_tokens
        self.window_keys = self.window_keys[:, :, :keep - start].contiguous()
        self.window_values = self.window_values[:, :, :keep - start].contiguous()
        self._drop_out_of_window()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        indices = torch.as_tensor(indices, device=self.window_keys.device)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self.key_store.index_batch(indices)
        self.value_store.index_batch(indices)
        self.window_keys = self.window_keys.index_select(0, indices)
        self.window_values = self.window_values.index_select(0, indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        self.key_store.repeat_batch(repeats)
        self.value_store.repeat_batch(repeats)
        self.window_keys = self.window_keys.repeat_interleave(repeats, dim=0)
        self.window_values = self.window_values.repeat_interleave(repeats, dim=0)

    @property
    def batch_size(self) -> int:
        return self.window_keys.shape[0]

    # ---- byte accounting --------------------------------------------------------------------------------------
    def tensors_by_item(self) -> dict[str, list[torch.Tensor]]:
        out = {k: [] for k in ITEMS}
        if not self.is_initialized:
            return out
        for store in (self.key_store, self.value_store):
            for k, ts in store.tensors_by_kind().items():
                out[k].extend(ts)
        out["window"] = [self.window_keys, self.window_values]
        return out

    def num_elements(self) -> int:
        """Key and value entries represented (tokens x heads x head_dim x batch, for K and V)."""
        if not self.is_initialized:
            return 0
        b, h, _, d = self.window_keys.shape
        return 2 * b * h * d * self.held_length()


class KIVILayer(GEARLayer):
    """KIVI: the same streaming storage with quantization only (no outliers, no low-rank term)."""

    def __init__(self, settings: KVCacheSettings, reads_storage=lambda: False, sliding_window: int | None = None,
                 layer_idx: int | None = None):
        super().__init__(settings.model_copy(update=dict(method="kivi", outlier_ratio=0.0, key_rank=0, value_rank=0,
                                                         key_prefill_rank=None, value_prefill_rank=None)),
                         reads_storage, sliding_window, layer_idx)


class GEARCache(Cache):
    """A transformers `Cache` whose layers are GEARLayer (or KIVILayer for `method="kivi"`); layers listed in
    `skip_layers` keep a plain DynamicLayer. Keyword arguments are `KVCacheSettings` fields."""

    def __init__(self, config, settings: KVCacheSettings | None = None, **kwargs: Any):
        if not callable(getattr(config, "get_text_config", None)):  # e.g. the model itself: it reads model.config
            hint = " (pass model.config)" if callable(getattr(getattr(config, "config", None), "get_text_config",
                                                              None)) else ""
            raise CompressError(f"GEARCache takes the model's config{hint}, got {type(config).__name__}")
        if settings is not None and kwargs:
            raise CompressError("GEARCache: pass either settings or keyword arguments, not both")
        if settings is not None and not isinstance(settings, KVCacheSettings):
            raise CompressError(f"GEARCache: settings= takes KVCacheSettings (or pass keyword arguments: "
                                f"GEARCache(config, bits=4, ...)), got {type(settings).__name__}")
        settings = settings or KVCacheSettings.build(**kwargs)
        text_config = config.get_text_config(decoder=True)
        num_layers = text_config.num_hidden_layers
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        settings.check_against_model(head_dim, num_layers)
        self.settings = settings

        def reads_storage() -> bool:
            return getattr(text_config, "_attn_implementation", None) == ATTENTION_NAME

        layer_cls = KIVILayer if settings.method == "kivi" else GEARLayer
        self.sliding_windows = sliding = sliding_windows(config)
        skipped_sliding = set(settings.skip_layers) & set(sliding)
        if skipped_sliding and skipped_sliding != set(sliding):
            # transformers builds one sliding mask from the first sliding layer's sizes: a compressed sliding layer
            # drops whole pages, transformers' own drops token by token, and one mask cannot fit both
            raise ConfigError(f"skip_layers {sorted(skipped_sliding)} are some of this model's sliding-window "
                                f"layers {sorted(sliding)}: skip all of them or none")

        def layer(i: int):
            if i in settings.skip_layers:
                return uncompressed_layer(i, sliding)
            return layer_cls(settings, reads_storage, sliding.get(i), layer_idx=i)

        super().__init__(layers=[layer(i) for i in range(num_layers)])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):  # transformers' IndexError otherwise (shapes it takes as they come)
            raise CompressError(
                f"this GEARCache was built for a config of {len(self.layers)} decoder layer(s), and the model using "
                f"it has more (layer {layer_idx}): build the cache from that model's config "
                "(GEARCache(model.config, ...))")
        layer = self.layers[layer_idx]
        held = getattr(layer, "window_keys", None) if layer.is_initialized else None
        if held is not None and held.shape[0] != key_states.shape[0]:  # (a reshape error deep in attention else)
            raise CompressError(f"this GEARCache holds {held.shape[0]} sequence(s) and was given {key_states.shape[0]}:"
                                " a cache serves one batch; call cache.reset() (or build a new one) before another")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> dict[str, int]:
        """Bytes held by the cache's tensors, itemized (codes, scales_zeros, lowrank, outlier_values,
        outlier_indices, window; uncompressed skipped layers under `dense`; the states and window buffers of a
        linearized model's recurrent layers under `recurrent`) plus `total`."""
        from ..linearize.cache import LinearizedLayer  # a linearized layer swaps its slot for one (attention.py)

        items = {k: [] for k in ITEMS}
        items["dense"], items["recurrent"] = [], []
        for layer in self.layers:
            if isinstance(layer, GEARLayer):
                for k, ts in layer.tensors_by_item().items():
                    items[k].extend(ts)
            elif isinstance(layer, LinearizedLayer):
                items["recurrent"].extend(layer.tensors())
            elif layer.is_initialized and layer.keys is not None:
                items["dense"].extend([layer.keys, layer.values])
        out = {k: storage_bytes(ts) for k, ts in items.items()}
        out["total"] = storage_bytes([t for ts in items.values() for t in ts])
        return out

    def num_elements(self) -> int:
        total = 0
        for layer in self.layers:
            if isinstance(layer, GEARLayer):
                total += layer.num_elements()
            elif layer.is_initialized and layer.keys is not None and layer.keys.numel():
                total += layer.keys.numel() + layer.values.numel()
        return total

    def bits_per_element(self) -> float:
        """Measured bits per cached key/value entry: 8 x bytes held for keys/values / entries represented
        (recurrent layers' states represent no entries and are left out)."""
        n = self.num_elements()
        held = self.nbytes()
        return 8 * (held["total"] - held["recurrent"]) / n if n else 0.0


def sliding_windows(config) -> dict[int, int]:
    """{layer index: window} of the layers whose attention slides (Mistral's `sliding_window`; Qwen2's
    `use_sliding_window` / `layer_types`), as transformers' own DynamicCache builds them for this config."""
    from transformers import DynamicCache

    try:
        layers = DynamicCache(config=config).layers
    except (AttributeError, TypeError):  # not a transformers config (a bare namespace): no sliding layers it names
        return {}
    return {i: int(layer.sliding_window) for i, layer in enumerate(layers) if getattr(layer, "is_sliding", False)}


def uncompressed_layer(i: int, sliding: dict[int, int]) -> CacheLayerMixin:
    """Layer i of transformers' own cache: a sliding-window layer where the attention slides (`sliding_windows`)."""
    return DynamicSlidingWindowLayer(sliding_window=sliding[i]) if i in sliding else DynamicLayer()


def dynamic_cache_bytes(cache) -> tuple[int, int]:
    """(bytes held, entries) of any transformers cache whose layers expose `keys`/`values` tensors."""
    tensors, n = [], 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            tensors += [layer.keys, layer.values]
            n += layer.keys.numel() + layer.values.numel()
    return storage_bytes(tensors), n


def _held_tensors(obj):
    """The plain tensors that really hold `obj`'s bytes: a tensor subclass (optimum-quanto's packed codes) is opened
    through `__tensor_flatten__` down to the tensors with storage; tuples/lists and dicts (HQQ's scale/zero metadata)
    are walked."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            for name in obj.__tensor_flatten__()[0]:
                yield from _held_tensors(getattr(obj, name))
        else:
            yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _held_tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _held_tensors(x)


def quantized_cache_bytes(cache) -> tuple[int, int]:
    """(bytes held, key/value entries represented) of transformers' QuantizedCache, any backend (fp8, quanto, HQQ):
    the quantized codes with their scales/zeros, plus the full-precision residual tokens not yet quantized.
    Entries: each layer's token count x batch x KV heads x head_dim (the quantized tensor's logical shape; HQQ keeps
    it in its metadata)."""
    tensors, entries = [], 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer._quantized_keys is None:  # (reset() keeps the flag)
            continue
        held = [layer._quantized_keys, layer._quantized_values, layer.keys, layer.values]
        tensors += [t for item in held for t in _held_tensors(item) if t.numel()]
        codes, meta = (layer._quantized_keys, None) if isinstance(layer._quantized_keys, torch.Tensor) \
            else layer._quantized_keys
        b, h, _, d = meta["shape"] if isinstance(meta, dict) else codes.shape
        entries += 2 * layer.cumulative_length * b * h * d
    return storage_bytes(tensors), entries

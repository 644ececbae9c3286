"""Logits of a text as a GEARCache serves it, in one forward pass.

Fed through the cache in chunks of `residual_length` (`quality.chunked_logits`, what `compress eval` and the suite
score: every token after the first chunk attends to the compressed past, as when generating), token t of chunk c
attends to chunks 0..c-1 as the cache stores them and to chunk c's tokens up to t exactly. A chunk's stored form
depends only on its own keys/values and its page's low-rank basis (made from the page's first chunk), never on when
it is read, so the same attention comes out of one forward: each layer compresses its keys and values chunk by chunk
exactly as the cache would (the layer's own `_store`), then attends over [reconstruction ++ exact] with a mask that
picks, per query, the reconstruction of earlier chunks and the exact keys of its own chunk. The chunked path runs
the model T / residual_length times on short inputs and reads the past through per-page Python; this runs it once
(`benchmarks/kv_served_logits.py`: the ratio, and the largest logit difference, float32 round-off).

Used where the chunked path would give the same logits: no sliding-window layer (those drop pages as the window
moves), a decoder whose attention modules name their `layer_idx` and take transformers' attention interface, and
unpadded ids. Anything else goes the chunked way (`served_logits` returns None)."""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import GEARCache, sliding_windows
from .config import KVCacheSettings

SERVED_ATTENTION = "gear_kv_served"
QUERY_BLOCK = 256  # query rows per attention block (its mask: block x <= 2T booleans)
_active = threading.local()  # the cache layers of the forward being scored (set by served_logits)


def stored_reconstruction(layer, keys: torch.Tensor, values: torch.Tensor, chunks: int):
    """(K_hat, V_hat) [B, H, chunks*C, D] float32: the first `chunks` chunks of keys/values [B, H, T, D] as
    `layer` (a fresh GEARLayer) stores them when they arrive one chunk per forward."""
    c = layer.settings.residual_length
    layer.lazy_initialization(keys, values)
    per_page, j = layer.key_store.page_chunks, 0
    while j < chunks:
        # a page's first chunk alone (its low-rank basis comes from the chunks of the append that opens it), then
        # the rest of that page in one append: projected onto that basis chunk by chunk, as one chunk per forward
        take = 1 if j % per_page == 0 else min(chunks - j, per_page - j % per_page)
        layer._store(keys[:, :, j * c:(j + take) * c], values[:, :, j * c:(j + take) * c])
        j += take
    return layer.key_store.dequantize(), layer.value_store.dequantize()


def attention_as_served(query, keys, values, k_hat, v_hat, chunk_len: int, scaling: float) -> torch.Tensor:
    """query [B, Hq, T, D] over keys/values [B, H, T, D] (exact) and their stored reconstruction k_hat/v_hat
    [B, H, N, D] (N: whole chunks): row t sees reconstructed positions before its chunk and exact positions of its
    chunk up to t. One masked SDPA over [reconstruction ++ exact] per block of query rows, in float32 (float64 for
    a float64 query); [B, Hq, T, D]."""
    b, hq, t, d = query.shape
    dtype = torch.promote_types(query.dtype, torch.float32)
    pos = torch.arange(t, device=query.device)
    chunk_of = pos // chunk_len
    out = torch.empty(b, hq, t, values.shape[-1], dtype=dtype, device=query.device)
    for s in range(0, t, QUERY_BLOCK):
        e = min(s + QUERY_BLOCK, t)
        rows = chunk_of[s:e]
        past = min(int(rows[-1]) * chunk_len, k_hat.shape[2])  # reconstructed positions any row here sees
        first = int(rows[0]) * chunk_len  # exact positions any row here sees: its own chunk's, from here
        k = torch.cat([k_hat[:, :, :past].to(dtype), keys[:, :, first:e].to(dtype)], 2)
        v = torch.cat([v_hat[:, :, :past].to(dtype), values[:, :, first:e].to(dtype)], 2)
        sees_past = pos[None, :past] < (rows * chunk_len)[:, None]
        sees_exact = (chunk_of[None, first:e] == rows[:, None]) & (pos[None, first:e] <= pos[s:e, None])
        out[:, :, s:e] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e].to(dtype), k, v, attn_mask=torch.cat([sees_past, sees_exact], -1), scale=scaling,
            enable_gqa=hq != keys.shape[1])
    return out


def _served_attention_forward(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs):
    layer = _active.layers[module.layer_idx]
    _active.served.add(module.layer_idx)
    c = layer.settings.residual_length if hasattr(layer, "key_store") else None  # (skip_layers: a DynamicLayer)
    chunks = (query.shape[2] - 1) // c if c else 0  # the last chunk is read by no one: the chunks before it
    if not chunks:  # a layer the cache keeps uncompressed, or text within one chunk
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    k_hat, v_hat = stored_reconstruction(layer, key, value, chunks)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attention_as_served(query, key, value, k_hat, v_hat, c, scaling).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SERVED_ATTENTION, _served_attention_forward)
AttentionMaskInterface.register(SERVED_ATTENTION, sdpa_mask)


def served_in_one_pass(model: nn.Module) -> bool:
    """Whether `served_logits` covers this model (see the module docstring)."""
    config = model.config
    if sliding_windows(config) or not callable(getattr(model, "set_attn_implementation", None)):
        return False
    if config.get_text_config(decoder=True) is not config:  # a composite model (vision-language): sub-configs
        return False  # with attention settings of their own, which one switch and its restore would not keep
    attention = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    return bool(attention) and all(isinstance(getattr(m, "layer_idx", None), int) for m in attention)


@contextlib.contextmanager
def _attention_implementation(model: nn.Module, name: str):
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@torch.no_grad()
def served_logits(model: nn.Module, ids: torch.Tensor, settings: KVCacheSettings) -> torch.Tensor | None:
    """Logits [B, T, V] (float32) of unpadded ids [B, T] as `quality.chunked_logits` with a GEARCache of `settings`
    gives them, from one forward; None where the model is not one this covers (see the module docstring)."""
    if not served_in_one_pass(model):
        return None
    cache = GEARCache(model.config, settings)  # fresh layers, used for their storage only
    _active.layers, _active.served = cache.layers, set()
    try:
        with _attention_implementation(model, SERVED_ATTENTION):
            logits = model(input_ids=ids, use_cache=False).logits.float()
        # a model on transformers' older attention code ignores the switch (a warning, nothing else): its layers
        # never came here, and its logits never read the cache
        return logits if _active.served == set(range(len(cache.layers))) else None
    finally:
        _active.layers = _active.served = None

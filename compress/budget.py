"""One byte budget for a compressed model: weights per component (original vs stored, the output head on its own
line) and the KV cache's bytes per token, so the effect of every pass of a composed recipe reads in one table.

Weights are counted from the tensors the checkpoint stores (inspection.bytes_by_component) against the same
architecture uncompressed at the same storage dtype (a meta model: no memory). KV bytes per token are measured,
not computed: `tokens` random keys/values are appended to one layer of the cache the checkpoint generates with
(an uncompressed transformers cache, or the GEAR/KIVI cache of its `gear_kv` pass) and the bytes its tensors hold
are divided by the tokens; every compressed layer stores alike, so the layer count multiplies it. A compressed
cache keeps its latest 0 .. residual_length - 1 tokens uncompressed, so its bytes per token depend on where in that
cycle a length falls (least at whole chunks): the figure is the mean over one cycle of decode steps, with its
range. Linearized layers add nothing per token: their recurrent state (and the hybrid's window buffer) is a
constant, reported apart."""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from .inspection import bytes_by_component

KV_TOKENS = 1024  # a multiple of every residual window the GEAR settings allow by default; fills whole chunks


def original_bytes_by_component(config, storage_dtype: torch.dtype) -> dict[str, int]:
    """What the uncompressed model of `config` stores per component at `storage_dtype`."""
    from .models import empty_model

    plain = empty_model(config, dtype=storage_dtype, meta=True)
    return {k: v["dense"] + v["compressed"] for k, v in bytes_by_component(plain, storage_dtype).items()}


def _original_config(config, section: dict[str, Any] | None):
    """The config of the model before the passes: vq_logits, prune and quantize untie a tied head they compress
    (the config then says untied), and the original stored that matrix once."""
    untied = any(e.get("untied") or (e.get("restore") or {}).get("untied") for e in (section or {}).get("passes", []))
    if not untied:
        return config
    original = copy.deepcopy(config)
    original.tie_word_embeddings = True
    return original


def kv_bytes_per_token(config, settings=None, tokens: int = KV_TOKENS, dtype: torch.dtype = torch.float16,
                       linearized: dict[int, int] | None = None) -> dict:
    """{"uncompressed", "compressed"} bytes per token over all layers (compressed: None without `settings` or
    linearized layers). `linearized`: {layer index: bytes its recurrent cache holds at any length}; those layers
    add nothing per token, and their sum is reported as `recurrent_bytes` (batch 1)."""
    from transformers import DynamicCache

    from .kvcache.cache import GEARCache, dynamic_cache_bytes

    text = config.get_text_config(decoder=True)
    layers = text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    shape = (1, text.num_key_value_heads, tokens, head_dim)
    keys, values = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    dense = DynamicCache(config=config)
    dense.update(keys, values, 0)
    per_layer_dense = dynamic_cache_bytes(dense)[0] / tokens
    out = {"tokens_measured": tokens, "uncompressed": per_layer_dense * layers, "compressed": None}
    linearized = linearized or {}
    if settings is None and not linearized:
        return out
    softmax = [i for i in range(layers) if i not in linearized]
    skipped = set(settings.skip_layers) if settings is not None else set(softmax)
    layer = next((i for i in softmax if i not in skipped), None)
    cycle = [0.0]
    if layer is not None:
        cache = GEARCache(config, settings)
        cache.update(keys, values, layer)
        cycle = [cache.nbytes()["total"] / tokens]
        # then one token at a time (decode steps) until the uncompressed window is one short of full again
        steps = (torch.randn((1, shape[1], settings.residual_length - 1, head_dim), generator=gen).to(dtype)
                 for _ in range(2))
        with warnings.catch_warnings():  # its advice on attention (read the packed store) is about decoding speed
            warnings.simplefilter("ignore", UserWarning)
            for j, (k, v) in enumerate(zip(*(s.split(1, dim=2) for s in steps)), start=1):
                cache.update(k, v, layer)
                cycle.append(cache.nbytes()["total"] / (tokens + j))
    for key, per_layer in (("compressed", sum(cycle) / len(cycle)), ("compressed_min", min(cycle)),
                           ("compressed_max", max(cycle))):
        out[key] = sum(per_layer_dense if i in skipped else per_layer for i in softmax)
    if layer is not None:  # a compressed cache measured over its window's cycle (not for linearized layers alone)
        out["tokens_cycle"] = [tokens, tokens + len(cycle) - 1]
    labels = [_cache_label(settings)] if settings is not None else []
    if linearized:
        labels.append(f"{len(linearized)} of {layers} layers linearized")
        out["recurrent_bytes"] = sum(linearized.values())
    out["cache"] = "; ".join(labels)
    return out


def budget(model: nn.Module, section: dict[str, Any] | None, storage_dtype: torch.dtype,
           components: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    """{"weights": {component: {"original", "stored"}}, "weights_total": {...}, "kv_per_token": {...}}.
    `components`: the stored bytes per component when the model cannot show them (a compressed-tensors folder,
    counted from its files)."""
    components = components if components is not None else bytes_by_component(model, storage_dtype)
    stored = {k: v["dense"] + v["compressed"] for k, v in components.items()}
    original = original_bytes_by_component(_original_config(model.config, section), storage_dtype)
    weights = {c: {"original": original.get(c, 0), "stored": stored.get(c, 0)}
               for c in sorted(set(stored) | set(original))}
    total = {k: sum(v[k] for v in weights.values()) for k in ("original", "stored")}
    settings = None
    for entry in (section or {}).get("passes", []):
        if entry.get("pass") == "gear_kv":
            from .registry import get_pass

            settings = get_pass("gear_kv")(entry.get("args") or {}).settings()
    from .linearize import LinearizedAttention

    linearized = {m.layer_idx: m.cache_bytes() for m in model.modules() if isinstance(m, LinearizedAttention)}
    return {"weights": weights, "weights_total": total,
            "kv_per_token": kv_bytes_per_token(model.config, settings, linearized=linearized)}


def _cache_label(settings) -> str:
    """"gear 4-bit", with the storage formats that differ from GEAR's/KIVI's own (one-byte scales, fp8 factors)."""
    kb, vb = settings.bits_of("key"), settings.bits_of("value")
    parts = [f"{settings.method} {kb}-bit" if kb == vb else f"{settings.method} K{kb}/V{vb}-bit"]
    if settings.scale_format != "fp16":
        parts.append("one-byte scales")
    ranks = (settings.key_rank, settings.value_rank, settings.key_prefill_rank or 0, settings.value_prefill_rank or 0)
    if settings.lowrank_dtype != "float16" and any(ranks):
        parts.append("fp8 factors")
    return ", ".join(parts)

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
from .pass_api import storage_bytes

KV_TOKENS = 1024  # a multiple of every residual window the GEAR settings allow by default; fills whole chunks


def original_bytes_by_component(config, storage_dtype: torch.dtype,
                                headers: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> dict[str, int]:
    """What the uncompressed model of `config` stores per component at `storage_dtype`; with the checkpoint's
    `headers`, a tensor it stores under the same name at its dtype there (a head kept float32 was float32 before)."""
    from .models import empty_model

    plain = empty_model(config, dtype=storage_dtype, meta=True)
    return {k: v["dense"] + v["compressed"] for k, v in bytes_by_component(plain, storage_dtype, headers).items()}


def original_headers(headers: dict[str, tuple[str, tuple[int, ...]]] | None,
                     section: dict[str, Any] | None) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """The checkpoint's `headers` that tell the original's dtypes: without the weights a compressed-tensors export
    stored dense in float32 (`stored_dense`: code x scale needs more mantissa than bf16 has), an upcast of the
    export's own; the original held them at the model's storage dtype."""
    export = (section or {}).get("export")
    dense = export.get("stored_dense") if isinstance(export, dict) else None
    if not headers or not dense or not isinstance(dense, (dict, list)) or not section.get("export_format"):
        return headers
    upcast = {f"{name}.weight" for name in dense}
    return {name: info for name, info in headers.items() if name not in upcast}


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
                       linearized: dict[int, int] | None = None, total_at: int | None = None) -> dict:
    """{"uncompressed", "compressed"} bytes per token over all layers (compressed: None without `settings` or
    linearized layers). `linearized`: {layer index: bytes its recurrent cache holds at any length}; those layers
    add nothing per token, and their sum is reported as `recurrent_bytes` (batch 1). A sliding-window layer
    (Mistral's, Qwen2's) holds at most its window: uncompressed, transformers keeps window - 1 tokens; compressed,
    whole pages past the window are dropped; both are measured at `tokens`. `total_at`: also "total_at": {"tokens",
    "uncompressed", "compressed"}, the whole cache (and states) at that length, batch 1: per-token figures hide that
    a linearized model's constant state can outweigh a sliding-window model's capped cache."""
    from transformers.cache_utils import DynamicLayer

    from .kvcache.cache import GEARCache, sliding_windows

    text = config.get_text_config(decoder=True)
    layers = text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    shape = (1, text.num_key_value_heads, tokens, head_dim)
    keys, values = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    full = DynamicLayer()
    full.update(keys, values)
    per_layer_dense = storage_bytes([full.keys, full.values]) / tokens
    sliding = sliding_windows(config)

    def dense(i: int) -> float:  # transformers' own cache for layer i
        return per_layer_dense * (min(tokens, sliding[i] - 1) / tokens if i in sliding else 1.0)

    def scaled(i: int, per_token: float, n: int, cap_less: int) -> float:
        """Layer i's bytes at n tokens from its per-token figure at `tokens` (capped at its window, less `cap_less`)."""
        cap = sliding[i] - cap_less if i in sliding else n
        return per_token * tokens * min(n, cap) / min(tokens, cap)

    out = {"tokens_measured": tokens, "uncompressed": sum(dense(i) for i in range(layers)), "compressed": None}
    if total_at:
        out["total_at"] = {"tokens": total_at, "uncompressed": sum(scaled(i, dense(i), total_at, 1)
                                                                    for i in range(layers)), "compressed": None}
    linearized = linearized or {}
    if settings is None and not linearized:
        return out
    softmax = [i for i in range(layers) if i not in linearized]
    skipped = set(settings.skip_layers) if settings is not None else set(softmax)
    # every compressed layer of one kind (full, or sliding with one window) stores alike: one of each is measured
    kinds: dict[int | None, int] = {}
    for i in softmax:
        if i not in skipped:
            kinds.setdefault(sliding.get(i), i)
    measured = {kind: _compressed_cycle(GEARCache(config, settings), i, keys, values, settings, gen)
                for kind, i in kinds.items()}
    cycles = {kind: cycle for kind, (cycle, _) in measured.items()}
    for key, pick in (("compressed", lambda c: sum(c) / len(c)), ("compressed_min", min), ("compressed_max", max)):
        out[key] = sum(dense(i) if i in skipped else pick(cycles[sliding.get(i)]) for i in softmax)
    if total_at:  # (a compressed sliding layer keeps whole pages: up to its window and a page, ~ its window)
        mean = {kind: sum(c) / len(c) for kind, c in cycles.items()}

        def compressed_at(i: int) -> float:
            kind = sliding.get(i)
            if kind is not None or total_at < tokens:
                return scaled(i, mean[kind], total_at, 0)
            # a full layer: what it held at the same point of its window's cycle, plus whole compressed chunks
            # (linear in them); a mean per token times the length was 7% high at 32k, low at 1k
            cycle, chunk_bytes_per_token = measured[kind]
            j = (total_at - tokens) % len(cycle)
            return cycle[j] * (tokens + j) + (total_at - tokens - j) * chunk_bytes_per_token

        out["total_at"]["compressed"] = sum(linearized.values()) + sum(
            scaled(i, dense(i), total_at, 1) if i in skipped else compressed_at(i) for i in softmax)
    if kinds:  # a compressed cache measured over its window's cycle (not for linearized layers alone)
        out["tokens_cycle"] = [tokens, tokens + len(next(iter(cycles.values()))) - 1]
    labels = [_cache_label(settings)] if settings is not None else []
    if sliding:
        windows = sorted(set(sliding.values()))
        labels.append(f"{len(sliding)} of {layers} layers with a sliding window of {'/'.join(map(str, windows))}")
    if linearized:
        labels.append(f"{len(linearized)} of {layers} layers linearized")
        out["recurrent_bytes"] = sum(linearized.values())
    out["cache"] = "; ".join(labels)
    return out


def _compressed_cycle(cache, layer: int, keys, values, settings, gen) -> tuple[list[float], float]:
    """(bytes per token layer `layer` of `cache` holds after the prompt, then after each decode step until its fp16
    window is one short of full again: the cycle of a compressed cache's per-token bytes; the bytes per token of
    compressed chunks alone, from one more step, which compresses the full window: a whole chunk more than the
    prompt's, at the same point of the cycle)."""
    tokens, dtype = keys.shape[2], keys.dtype

    def held(n: int) -> float:
        return storage_bytes([t for ts in cache.layers[layer].tensors_by_item().values() for t in ts]) / n

    cache.update(keys, values, layer)
    cycle = [held(tokens)]
    steps = (torch.randn((1, keys.shape[1], settings.residual_length - 1, keys.shape[3]), generator=gen).to(dtype)
             for _ in range(2))
    with warnings.catch_warnings():  # its advice on attention (read the packed store) is about decoding speed
        warnings.simplefilter("ignore", UserWarning)
        for j, (k, v) in enumerate(zip(*(s.split(1, dim=2) for s in steps)), start=1):
            cache.update(k, v, layer)
            cycle.append(held(tokens + j))
        k, v = (torch.randn((1, keys.shape[1], 1, keys.shape[3]), generator=gen).to(dtype) for _ in range(2))
        cache.update(k, v, layer)
    chunk = len(cycle)
    return cycle, (held(tokens + chunk) * (tokens + chunk) - cycle[0] * tokens) / chunk


def budget(model: nn.Module, section: dict[str, Any] | None, storage_dtype: torch.dtype,
           components: dict[str, dict[str, int]] | None = None,
           headers: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> dict[str, Any]:
    """{"weights": {component: {"original", "stored"}}, "weights_total": {...}, "kv_per_token": {...}}.
    `components`: the stored bytes per component when the model cannot show them (a compressed-tensors folder,
    counted from its files). `headers`: the checkpoint's safetensors headers, so that both sides count each tensor
    at the dtype the files hold (pass the main floating dtype of `original_headers` as `storage_dtype`), not
    config.json's; an export's float32 upcasts count at `storage_dtype` on the original side."""
    components = components if components is not None else bytes_by_component(model, storage_dtype, headers)
    stored = {k: v["dense"] + v["compressed"] for k, v in components.items()}
    original = original_bytes_by_component(_original_config(model.config, section), storage_dtype,
                                           original_headers(headers, section))
    weights = {c: {"original": original.get(c, 0), "stored": stored.get(c, 0)}
               for c in sorted(set(stored) | set(original))}
    total = {k: sum(v[k] for v in weights.values()) for k in ("original", "stored")}
    settings = None
    for entry in (section or {}).get("passes", []):
        if entry.get("pass") == "gear_kv":
            from .registry import get_pass

            settings = get_pass("gear_kv").from_record(entry.get("args") or {}).settings()
    from .linearize import LinearizedAttention
    from .models import context_length

    linearized = {m.layer_idx: m.cache_bytes() for m in model.modules() if isinstance(m, LinearizedAttention)}
    return {"weights": weights, "weights_total": total,
            "kv_per_token": kv_bytes_per_token(model.config, settings, linearized=linearized,
                                               total_at=context_length(model.config) or 32768)}


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

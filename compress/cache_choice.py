"""The cache implementation a checkpoint's generation_config names, against the cache its passes chose.

Source models may ship a generation_config.json naming `cache_implementation` (often "static"); the checkpoint
carries it. A gear_kv model generates with its own compressed cache whatever is named, and linearized layers cannot
use a static cache at all (no recurrent state): every `generate` of such a model failed, `compress generate`
included (it has no option to choose another cache), or warned at every call. The name is removed where the passes
apply (with a note in their report) and where compress.load sets a checkpoint's generation_config. A caller who
names an implementation to `generate` still gets it, or the clear refusal."""
from __future__ import annotations

from torch import nn

STATIC_FALLBACK = ("static", "offloaded_static", "sliding_window", "hybrid")


def drop_unusable_cache_implementation(model: nn.Module) -> str | None:
    """Remove the generation_config's cache implementation where the model's passes replace or cannot use it;
    returns the name removed (None: nothing named, or nothing to remove)."""
    from transformers.generation import configuration_utils

    from .linearize.attention import LinearizedAttention

    config = getattr(model, "generation_config", None)
    named = getattr(config, "cache_implementation", None)
    if named is None:
        return None
    static = getattr(configuration_utils, "ALL_STATIC_CACHE_IMPLEMENTATIONS", STATIC_FALLBACK)
    compressed_cache = getattr(model, "kv_cache_settings", None) is not None
    linearized = named in static and any(isinstance(m, LinearizedAttention) for m in model.modules())
    if not (compressed_cache or linearized):
        return None
    config.cache_implementation = None
    return named


def removed_note(named: str, why: str) -> str:
    return f"the model's generation_config named cache_implementation={named!r}, which {why}; removed"

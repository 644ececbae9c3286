"""Linearization (Liger): softmax attention -> gated linear attention built from the pretrained projections, with
no new parameters; Liger Attention adds a sliding-window softmax branch. Constant-size cache per layer.

    from compress.linearize import LinearizeSettings, linearize_model, LinearizedCache
    linearize_model(model, LinearizeSettings(variant="hybrid", window=64), layers="all")
    model.generate(ids)                                   # any cache; or cache=LinearizedCache(model)

or as a pass (`linearize` in a recipe, followed by `recover`). Layout: settings.py (what a layer computes, which
layers), attention.py (the module), cache.py (recurrent state + window ring buffer), convert.py (module swap),
pass_.py, mom.py (variant mom: Mixture-of-Memories, gated delta-rule memories with a router). The math lives in
compress.kernels.gla, compress.kernels.delta_rule and compress.kernels.window_attention."""
from .attention import LinearizedAttention
from .cache import LinearizedCache, LinearizedLayer, cache_nbytes
from .convert import linearize_model
from .mom import MixtureOfMemoriesAttention
from .settings import LinearizeSettings

__all__ = ["LinearizeSettings", "LinearizedAttention", "LinearizedCache", "LinearizedLayer",
           "MixtureOfMemoriesAttention", "cache_nbytes", "linearize_model"]

"""Compressed KV caches: GEAR (quantization + low-rank error + sparse outliers) and KIVI, streaming and append-only,
usable as `model.generate(..., cache=GEARCache(model.config, bits=4))`."""
from .attention import gear_attention_forward, use_compressed_attention
from .cache import GEARCache, GEARLayer, KIVILayer
from .config import KVCacheSettings

__all__ = ["GEARCache", "GEARLayer", "KIVILayer", "KVCacheSettings", "gear_attention_forward",
           "use_compressed_attention"]

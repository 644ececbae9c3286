"""Compressed KV caches for transformers 5.x: GEAR (quantized codes + low-rank error + sparse outliers) and KIVI,
streaming (an fp16 window of `residual_length` tokens, then append-only compressed chunks).

    from compress.kvcache import GEARCache, use_compressed_attention
    use_compressed_attention(model)        # attention reads the compressed storage (else: dense reconstruction)
    out = model.generate(**inputs, cache=GEARCache(model.config, bits=4, key_rank=1, value_rank=0))
    cache.nbytes()                         # bytes held, itemized; cache.bits_per_element()

or as a pass (`gear_kv` in a recipe), which makes a saved and reloaded model generate with this cache by default.
Layout: config.py (settings), gear_math.py (compression of a chunk), store.py (append-only storage), cache.py
(CacheLayerMixin layers + Cache), attention.py (the "gear_kv" attention implementation), pass_.py, quality.py,
served.py (a text scored as the cache serves it, in one forward)."""
from .attention import gear_attention_forward, use_compressed_attention
from .cache import GEARCache, GEARLayer, KIVILayer
from .config import KVCacheSettings

__all__ = ["GEARCache", "GEARLayer", "KIVILayer", "KVCacheSettings", "gear_attention_forward",
           "use_compressed_attention"]

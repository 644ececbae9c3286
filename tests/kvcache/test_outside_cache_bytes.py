"""Bytes held by transformers' QuantizedCache (the outside baselines of benchmarks/kv_cache.py and kv_serving.py),
counted by hand from each backend's layout: codes at `nbits`, a scale and a zero per group of 64 in the states'
dtype, and the full-precision residual tokens not yet quantized."""
import pytest
import torch
from transformers import LlamaConfig, QuantizedCache

from compress.kvcache.cache import quantized_cache_bytes

B, H, D, PROMPT, STEPS = 3, 2, 64, 300, 5


def filled(backend, nbits=None, dtype=torch.float32):
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=H, hidden_size=256, head_dim=D)
    cache = QuantizedCache(backend, cfg, nbits=nbits) if nbits else QuantizedCache(backend, cfg)
    gen = torch.Generator().manual_seed(0)
    for layer in range(2):
        cache.update(torch.randn(B, H, PROMPT, D, generator=gen, dtype=dtype),
                     torch.randn(B, H, PROMPT, D, generator=gen, dtype=dtype), layer)
        for _ in range(STEPS):
            cache.update(torch.randn(B, H, 1, D, generator=gen, dtype=dtype),
                         torch.randn(B, H, 1, D, generator=gen, dtype=dtype), layer)
    return cache


def expected(code_bits, per_group_bytes, residual_tokens, dtype_bytes):
    """Bytes of one layer's K and V: quantized prompt + fp residual, both sides."""
    quantized = B * H * PROMPT * D * code_bits // 8 + B * H * PROMPT * (D // 64) * per_group_bytes
    return 2 * (quantized + B * H * residual_tokens * D * dtype_bytes)


def test_a_reset_cache_holds_nothing():
    cache = filled("fp8")
    cache.reset()
    assert quantized_cache_bytes(cache) == (0, 0)


def test_fp8_cache_bytes():
    cache = filled("fp8")
    nbytes, entries = quantized_cache_bytes(cache)
    assert entries == 2 * 2 * B * H * (PROMPT + STEPS) * D
    # fp8 appends new tokens as codes (no residual); one float32 scale per tensor
    assert nbytes == 2 * 2 * (B * H * (PROMPT + STEPS) * D + 4)


@pytest.mark.parametrize("backend,module", [("quanto", "optimum.quanto"), ("hqq", "hqq")])
@pytest.mark.parametrize("nbits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groupwise_cache_bytes(backend, module, nbits, dtype):
    pytest.importorskip(module)
    cache = filled(backend, nbits, dtype)
    nbytes, entries = quantized_cache_bytes(cache)
    size = torch.finfo(dtype).bits // 8
    # the prompt is quantized at once; the STEPS later tokens wait in the residual (128 tokens) in full precision;
    # both backends keep a scale and a zero per group of 64 in the states' dtype
    group = 2 * size
    assert entries == 2 * 2 * B * H * (PROMPT + STEPS) * D
    assert nbytes == 2 * expected(nbits, group, STEPS, size)
    # the quantized part holds the prompt's tokens, the residual the later ones
    layer = cache.layers[0]
    keys = layer._dequantize(layer._quantized_keys)
    assert keys.shape == (B, H, PROMPT, D) and layer.keys.shape == (B, H, STEPS, D)

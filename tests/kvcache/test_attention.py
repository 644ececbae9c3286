"""The "gear_kv" attention (reads codes, scales, low-rank factors and outliers) against attention over the dense
reconstruction of the same cache (what the cache returns to sdpa), through the reference model."""
import pytest
import torch

from compress.kvcache import GEARCache


def run(lm, ids, mask, settings, steps):
    """Logits of a prefill then `steps` greedy decode steps, plus the cache."""
    cache = GEARCache(lm.config, **settings)
    logits = []
    with torch.no_grad():
        out = lm(ids, attention_mask=mask, cache=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = lm(nxt, attention_mask=mask, cache=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits, 1), cache


@pytest.mark.parametrize("settings", [dict(bits=2, outlier_ratio=0.02, key_rank=4, value_rank=2, key_prefill_rank=1),
                                      dict(bits=3, outlier_ratio=0.0, key_rank=0, value_rank=3),
                                      dict(method="kivi", bits=4)])
def test_compressed_attention_matches_dense_reconstruction(lm, heldout_ids, attn, settings):
    ids = torch.cat([heldout_ids[:, :180], heldout_ids[:, 300:480]])
    mask = torch.ones_like(ids)
    mask[1, :25] = 0  # left padding on the second row
    attn("sdpa")
    dense, _ = run(lm, ids, mask, settings, 16)  # crosses a chunk boundary (192) during decoding
    attn("gear_kv")
    ours, cache = run(lm, ids, mask, settings, 16)
    assert cache.layers[0].key_store.num_tokens == 192
    assert torch.allclose(ours, dense, atol=1e-3 * dense.abs().max().item(), rtol=0)


def test_compressed_attention_hands_no_dense_past_to_attention(lm, heldout_ids, attn):
    """With gear_kv, what `update` returns is only the window + new tokens (tagged with the compressed past)."""
    attn("gear_kv")
    cache = GEARCache(lm.config, bits=4)
    with torch.no_grad():
        lm(heldout_ids[:, :200], cache=cache, use_cache=True)
    k, v = cache.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), 0)
    assert k.shape[-2] == 200 - 192 + 1 and k._gear_past.num_tokens == 192 and v._gear_past.num_tokens == 192

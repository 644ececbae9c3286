"""GEARCache inside transformers' generate: exactness at 8 bits, left padding, byte accounting, crop/reorder."""
import pytest
import torch
from transformers import DynamicCache

from compress.errors import ConfigError
from compress.kvcache import GEARCache, KVCacheSettings
from compress.kvcache.cache import GEARLayer

EXACT = dict(bits=8, outlier_ratio=0.0, key_rank=0, value_rank=0)


@pytest.mark.parametrize("impl", ["gear_kv", "sdpa"])
def test_8bit_greedy_matches_uncompressed_cache(lm, heldout_ids, attn, impl, greedy):
    attn(impl)  # gear_kv: attention reads the compressed storage; sdpa: the cache returns the dense reconstruction
    ids = heldout_ids[:, :150]
    ref = greedy(lm, ids, DynamicCache(config=lm.config), 40)
    cache = GEARCache(lm.config, **EXACT)
    out = greedy(lm, ids, cache, 40)
    assert torch.equal(out, ref)
    layer = cache.layers[0]
    assert layer.key_store.num_tokens == 128 and layer.window_keys.shape[-2] == 189 - 128  # streamed in chunks


def test_left_padded_batch_matches_batch_of_one(lm, heldout_ids, attn, greedy):
    attn("gear_kv")
    a, b = heldout_ids[:, 200:330], heldout_ids[:, 400:490]  # 130 and 90 tokens
    pad = a.shape[1] - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    batch = greedy(lm, ids, GEARCache(lm.config, **EXACT), 30, attention_mask=mask)
    one_a = greedy(lm, a, GEARCache(lm.config, **EXACT), 30)
    one_b = greedy(lm, b, GEARCache(lm.config, **EXACT), 30)
    assert torch.equal(batch[0, a.shape[1]:], one_a[0, a.shape[1]:])
    assert torch.equal(batch[1, ids.shape[1]:], one_b[0, b.shape[1]:])


def all_tensors(cache):
    """Every tensor the cache's layers hold, found by walking their attributes (independently of nbytes)."""
    found = []
    for layer in cache.layers:
        for store in (layer.key_store, layer.value_store):
            for page in store.pages:
                found += [getattr(page, f) for f in vars(page) if isinstance(getattr(page, f), torch.Tensor)]
        found += [layer.window_keys, layer.window_values]
    return found


def test_nbytes_equals_tensor_storage_and_bits(lm, heldout_ids, attn):
    attn("gear_kv")
    cache = GEARCache(lm.config, bits=4, outlier_ratio=0.02, key_rank=2, value_rank=1)
    with torch.no_grad():
        lm(heldout_ids[:, :300], cache=cache, use_cache=True)
    items = cache.nbytes()
    tensors = all_tensors(cache)
    assert items["total"] == sum(t.untyped_storage().nbytes() for t in tensors)
    assert items["total"] == sum(v for k, v in items.items() if k != "total")
    assert all(items[k] > 0 for k in ("codes", "scales_zeros", "lowrank", "outlier_values", "outlier_indices", "window"))
    layer = cache.layers[0]
    n, w = layer.key_store.num_tokens, layer.window_keys.shape[-2]
    assert (n, w) == (256, 44)
    # by hand for one layer (B=1, H=2 KV heads, D=64, 4 chunks in one page), K and V each:
    codes = 2 * (2 * n * 64 * 4 // 8)                       # 4-bit codes
    scales = 2 * (2 * 2 * (n * 64 // 64) * 2)                # fp16 scale + zero per group of 64 entries
    outliers = 2 * (2 * (n * 64 // 64) * 2)                  # 2 outliers per group, K and V
    lowrank = (2 * (n + 64) * 2 + 2 * (n + 64) * 1) * 2      # fp16 A [n, r] + one basis [D, r]: r=2 (K), 1 (V)
    window = 2 * (2 * w * 64 * 2)                            # fp16 window
    per_layer = codes + scales + outliers * 2 + outliers * 1 + lowrank + window  # values fp16 + offsets uint8
    assert (items["outlier_values"], items["outlier_indices"]) == (6 * outliers * 2, 6 * outliers)
    assert items["total"] == 6 * per_layer
    assert cache.bits_per_element() == pytest.approx(8 * items["total"] / (6 * 2 * 2 * 64 * (n + w)))


def test_kivi_bits_per_element_by_hand(lm, heldout_ids):
    cache = GEARCache(lm.config, method="kivi", bits=2)
    with torch.no_grad():
        lm(heldout_ids[:, :256], cache=cache, use_cache=True)
    assert cache.nbytes()["window"] == 0 and cache.nbytes()["lowrank"] == 0
    assert cache.bits_per_element() == pytest.approx(2 + 2 * 16 / 64)  # codes + fp16 scale and zero per group


def test_log8_scales_read_like_their_reconstruction_and_cost_less(lm, heldout_ids, attn):
    """One-byte scales: attention over the compressed storage (gear_kv: the C kernel) gives the logits of attention
    over the cache's dense reconstruction (sdpa), and a KIVI-2 cache holds 2 + (8 + 16) / 64 bits per entry."""
    ids = heldout_ids[:, :300]
    logits = {}
    for impl in ("gear_kv", "sdpa"):
        attn(impl)
        cache = GEARCache(lm.config, bits=2, outlier_ratio=0.02, key_rank=1, value_rank=0, scale_format="log8")
        with torch.no_grad():
            lm(ids[:, :-1], cache=cache, use_cache=True)
            logits[impl] = lm(ids[:, -1:], cache=cache, use_cache=True).logits
        assert cache.layers[0].key_store.pages[0].scale.dtype == torch.uint8
    torch.testing.assert_close(logits["gear_kv"], logits["sdpa"], rtol=1e-4, atol=1e-4)
    bits = {}
    for fmt in ("fp16", "log8"):
        cache = GEARCache(lm.config, method="kivi", bits=2, scale_format=fmt)
        with torch.no_grad():
            lm(heldout_ids[:, :256], cache=cache, use_cache=True)
        bits[fmt] = cache.bits_per_element()
    assert bits == pytest.approx({"fp16": 2 + 32 / 64, "log8": 2 + 24 / 64})


def test_values_at_their_own_width(lm, heldout_ids):
    cache = GEARCache(lm.config, method="kivi", bits=4, value_bits=2)  # keys 4-bit, values 2-bit: 3 + 32/64
    with torch.no_grad():
        lm(heldout_ids[:, :256], cache=cache, use_cache=True)
    assert cache.bits_per_element() == pytest.approx(3.5)
    assert (cache.layers[0].key_store.bits, cache.layers[0].value_store.bits) == (4, 2)


def test_budget_names_the_storage_formats(lm):
    """`compress inspect`'s KV row: one-byte scales and fp8 factors are named, and cost fewer bytes per token."""
    from compress.budget import kv_bytes_per_token

    plain = kv_bytes_per_token(lm.config, KVCacheSettings.build(bits=4, key_rank=1, value_rank=0), tokens=256)
    lean = kv_bytes_per_token(lm.config, KVCacheSettings.build(bits=4, key_rank=1, value_rank=0, scale_format="log8",
                                                               lowrank_dtype="float8_e4m3fn"), tokens=256)
    assert plain["cache"] == "gear 4-bit" and lean["cache"] == "gear 4-bit, one-byte scales, fp8 factors"
    mixed = kv_bytes_per_token(lm.config, KVCacheSettings.build(method="kivi", bits=4, value_bits=2), tokens=256)
    assert mixed["cache"] == "kivi K4/V2-bit"
    assert lean["compressed"] < plain["compressed"]


@pytest.mark.parametrize("total", [256, 256 + 37, 256 + 2 * 64 + 63])
def test_budget_total_at_a_length_is_what_the_cache_holds_there(lm, total):
    """`compress inspect`'s "KV cache + states at N tokens": a mean per token times N was 7% high at 32k and low at
    1k (the fp16 window's share moves with the length); it is now what a cache holds at N (a 256-token prompt, then
    one token at a time), at every point of the window's cycle."""
    from compress.budget import kv_bytes_per_token

    settings = KVCacheSettings.build(bits=4, key_rank=1, value_rank=0)
    kv = kv_bytes_per_token(lm.config, settings, tokens=256, total_at=total)
    cache = GEARCache(lm.config, settings)
    text = lm.config.get_text_config(decoder=True)
    g = torch.Generator().manual_seed(1)

    def new(n):
        return torch.randn(1, text.num_key_value_heads, n, 64, generator=g).half()

    for layer in range(text.num_hidden_layers):
        cache.update(new(256), new(256), layer)
    for _ in range(total - 256):
        for layer in range(text.num_hidden_layers):
            cache.update(new(1), new(1), layer)
    assert kv["total_at"]["compressed"] == pytest.approx(cache.nbytes()["total"], rel=1e-6)


def test_skip_layers_keep_a_dense_layer(lm, heldout_ids):
    cache = GEARCache(lm.config, bits=4, skip_layers=[0, 5])
    with torch.no_grad():
        lm(heldout_ids[:, :100], cache=cache, use_cache=True)
    assert not isinstance(cache.layers[0], GEARLayer) and isinstance(cache.layers[1], GEARLayer)
    assert cache.nbytes()["dense"] == 2 * 2 * (2 * 100 * 64 * 4)  # two fp32 layers of K and V


def test_crop_reorder_select(lm, heldout_ids, attn):
    attn("gear_kv")
    cache = GEARCache(lm.config, bits=4)
    ids = torch.cat([heldout_ids[:, :150], heldout_ids[:, 1000:1150]])
    with torch.no_grad():
        lm(ids, cache=cache, use_cache=True)
    layer = cache.layers[2]
    before_k = layer.key_store.dequantize()
    cache.crop(-10)  # within the window: exact
    assert cache.get_seq_length() == 140 and layer.key_store.num_tokens == 128
    cache.crop(-20)  # into the last compressed chunk: it returns to the window as its reconstruction
    assert cache.get_seq_length() == 120 and layer.key_store.num_tokens == 64 and layer.window_keys.shape[-2] == 56
    assert torch.allclose(layer.window_keys[:, :, :56].float(), before_k[:, :, 64:120], atol=1e-3, rtol=1e-3)  # fp16
    kept = layer.key_store.dequantize()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.key_store.dequantize(), kept.flip(0))
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.layers[0].batch_size == 1 and torch.equal(layer.key_store.dequantize(), kept[:1])
    cache.batch_repeat_interleave(3)
    assert cache.layers[0].batch_size == 3


def test_beam_search_and_prompt_lookup_match_uncompressed_at_8_bits(lm, heldout_ids, attn, greedy):
    attn("gear_kv")
    ids = heldout_ids[:, :130]
    beams = greedy(lm, ids, GEARCache(lm.config, **EXACT), 12, num_beams=3)
    assert torch.equal(beams, greedy(lm, ids, DynamicCache(config=lm.config), 12, num_beams=3))
    # prompt-lookup (assisted) decoding crops the cache after rejected candidates
    looked = greedy(lm, ids, GEARCache(lm.config, **EXACT), 30, prompt_lookup_num_tokens=4)
    assert torch.equal(looked, greedy(lm, ids, DynamicCache(config=lm.config), 30))


def test_bad_settings_are_config_errors(lm):
    with pytest.raises(ConfigError, match="bits=5"):
        GEARCache(lm.config, bits=5)
    with pytest.raises(ConfigError, match="rank 100"):
        GEARCache(lm.config, key_rank=100)
    with pytest.raises(ConfigError, match="group_size 128 must divide head_dim"):
        GEARCache(lm.config, group_size=128, residual_length=128)
    with pytest.raises(ConfigError, match="kivi"):
        KVCacheSettings.build(method="kivi", key_rank=2)


def test_outlier_offsets_fit_their_byte():
    """An outlier's offset in its group is one byte: groups past 256 with outliers are refused (they wrapped: a
    planted outlier at channel 400 of a 512-group was corrected at channel 144), and 256 holds offset 255."""
    from compress.kvcache.store import CompressedStore

    wide = KVCacheSettings.build(method="gear", group_size=512, residual_length=512, outlier_ratio=0.01)
    with pytest.raises(ConfigError, match="at most 256"):
        wide.check_against_model(512)
    plain = KVCacheSettings.build(method="gear", group_size=512, residual_length=512, outlier_ratio=0.0)
    plain.check_against_model(512)  # without outliers: no offsets to store
    for axis, where in (("channel", (3, 255)), ("token", (255, 3))):
        store = CompressedStore(axis=axis, bits=4, group_size=256, chunk_len=256, outlier_ratio=0.01, power_iters=1,
                                page_chunks=1)
        x = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(0))
        x[0, 0, where[0], where[1]] = 50.0
        store.append(x, 0)
        err = (store.dequantize() - x).abs()
        assert err[0, 0, where[0], where[1]] < 0.1, axis  # the outlier is corrected where it is (was: 47)
        assert err.max() < 1.0, axis


def test_cache_constructors_say_what_they_take(lm):
    """Mistakes an API user makes (a helper's audit): the model for its config, a dict for settings, a config for the
    model; one CompressError each instead of an AttributeError from inside."""
    from compress import CompressError
    from compress.linearize.cache import LinearizedCache

    cases = [(lambda: GEARCache(lm), "takes the model's config \\(pass model.config\\)"),
             (lambda: GEARCache(lm.config, {"bits": 4}), "settings= takes KVCacheSettings"),
             (lambda: GEARCache(lm.config, KVCacheSettings.build(bits=4), bits=2), "not both"),
             (lambda: LinearizedCache(lm.config), "takes the linearized model itself")]
    for call, message in cases:
        with pytest.raises(CompressError, match=message):
            call()


def test_cache_built_for_a_shallower_model_says_so(lm, heldout_ids, attn):
    """A GEARCache built from the config of a model with fewer layers failed with an IndexError inside
    transformers; one CompressError naming the mismatch."""
    from compress import CompressError

    attn("gear_kv")
    config = lm.config.__class__.from_dict({**lm.config.to_dict(), "num_hidden_layers": 1})
    with pytest.raises(CompressError, match=r"built for a config of 1 decoder layer\(s\), and the model using it "
                                            r"has more \(layer 1\)"):
        lm(heldout_ids[:, :20], cache=GEARCache(config, bits=4), use_cache=True)


def test_a_cache_given_another_batch_says_to_reset(lm):
    """A used cache given a batch of another size failed in torch.cat ("Sizes of tensors must match")."""
    from compress import CompressError

    cache = GEARCache(lm.config, bits=4)
    with torch.no_grad():
        lm(torch.randint(0, 100, (2, 5)), cache=cache, use_cache=True)
        with pytest.raises(CompressError, match="holds 2 sequence.* given 1.*cache.reset()"):
            lm(torch.randint(0, 100, (1, 20)), cache=cache, use_cache=True)
        cache.reset()
        lm(torch.randint(0, 100, (1, 20)), cache=cache, use_cache=True)


def test_reset_starts_a_new_sequence(lm, heldout_ids, attn):
    """One cache, two conversations: after reset() it holds nothing and reads like a new cache (continuing it
    without a reset reads the old tokens as the new prompt's start, as transformers' own caches do)."""
    attn("gear_kv")
    cache = GEARCache(lm.config, bits=4)
    with torch.no_grad():
        lm(heldout_ids[:, :150], cache=cache, use_cache=True)
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.nbytes()["total"] == 0
        again = lm(heldout_ids[:, 300:440], cache=cache, use_cache=True).logits
        fresh = lm(heldout_ids[:, 300:440], cache=GEARCache(lm.config, bits=4), use_cache=True).logits
    assert torch.equal(again, fresh)

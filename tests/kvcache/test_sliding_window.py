"""GEARCache and LinearizedCache on models whose attention slides (Mistral's `sliding_window`, Qwen2's
`use_sliding_window`): every step's logits are the full forward's (the sliding mask) within 8-bit rounding, while a
compressed sliding layer drops the whole pages that fell out of the window, so it holds a bounded number of tokens;
skip_layers and the budget treat sliding layers as transformers does."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

import compress
from compress.budget import kv_bytes_per_token
from compress.errors import CompressError
from compress.kvcache import GEARCache, KVCacheSettings, use_compressed_attention
from compress.kvcache.cache import GEARLayer, sliding_windows

SMALL = dict(bits=8, group_size=8, residual_length=8, page_chunks=2)  # pages of 16 tokens: eviction shows early
CONFIGS = {
    "mistral": dict(model_type="mistral", sliding_window=24),
    "qwen2-mixed": dict(model_type="qwen2", use_sliding_window=True, sliding_window=24, max_window_layers=1),
}


def model_of(kind: str, layers: int = 2):
    kw = dict(CONFIGS[kind])
    config = AutoConfig.for_model(kw.pop("model_type"), vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("impl", ["gear_kv", "sdpa"])
@pytest.mark.parametrize("kind", CONFIGS)
def test_each_step_matches_the_sliding_forward_and_memory_stays_bounded(kind, impl):
    model = model_of(kind, layers=3)
    if impl == "gear_kv":
        use_compressed_attention(model)
    sliding = sliding_windows(model.config)
    assert sliding == ({0: 24, 1: 24, 2: 24} if kind == "mistral" else {1: 24, 2: 24})
    ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
        cache = GEARCache(model.config, **SMALL)
        steps = [model(ids[:, :30], cache=cache).logits] + [model(ids[:, i:i + 1], cache=cache).logits
                                                             for i in range(30, 90)]
    torch.testing.assert_close(torch.cat(steps, 1), reference, rtol=0, atol=3e-3)
    assert cache.get_seq_length() == 90
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, GEARLayer) and layer.is_sliding == (i in sliding)
        if i in sliding:  # the last 23 tokens are needed; whole 16-token pages before them are dropped
            assert layer.evicted > 0 and 23 <= layer.held_length() <= 23 + 16 + 7
            assert layer.evicted + layer.held_length() == 90
        else:
            assert layer.evicted == 0 and layer.held_length() == 90


def test_generate_with_left_padding_matches_the_uncompressed_sliding_cache():
    model = use_compressed_attention(model_of("mistral"))
    ids = torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    gen = dict(attention_mask=mask, max_new_tokens=60, do_sample=False, pad_token_id=0)
    ours = model.generate(ids, cache=GEARCache(model.config, **SMALL), **gen)
    assert torch.equal(ours, model.generate(ids, cache=DynamicCache(config=model.config), **gen))


def test_skip_layers_take_all_sliding_layers_or_none():
    model = model_of("mistral")
    with pytest.raises(CompressError, match=r"skip_layers \[0\] are some of this model's sliding-window layers"):
        GEARCache(model.config, skip_layers=[0], **SMALL)
    cache = GEARCache(model.config, skip_layers=[0, 1], **SMALL)
    assert all(type(layer) is DynamicSlidingWindowLayer for layer in cache.layers)
    # in a recipe: at the pass's line, like the other settings the model cannot take
    recipe = compress.Recipe.from_text(
        "passes:\n  - gear_kv: {bits: 4, group_size: 8, residual_length: 8, skip_layers: [0]}\n", source="r.yaml")
    with pytest.raises(CompressError, match=r"^r.yaml:2:5: skip_layers \[0\] are some"):
        compress.apply(model, recipe, progress=False)


def test_budget_counts_what_each_cache_holds_at_that_length():
    config = model_of("mistral").config
    settings = KVCacheSettings.build(bits=4, group_size=16)
    config.sliding_window = 4096
    long = kv_bytes_per_token(config, settings, tokens=8192)
    config.sliding_window = None
    full = kv_bytes_per_token(config, settings, tokens=8192)
    assert long["uncompressed"] == pytest.approx(full["uncompressed"] * 4095 / 8192)
    assert long["compressed"] < 0.6 * full["compressed"]  # pages past the window dropped (up to one page more held)
    assert "sliding window of 4096" in long["cache"] and "sliding" not in full["cache"]


def test_linearized_cache_keeps_sliding_layers_sliding_and_the_hybrid_says_its_reach():
    from compress.linearize.cache import LinearizedCache

    model = model_of("mistral", layers=4)
    _, report = compress.apply(model, [compress.get_pass("linearize")(variant="hybrid", layers="every_2")],
                               progress=False)
    assert any("sliding window of 24 tokens; the hybrid's window branch sees 64" in n for n in report.passes[0].notes)
    cache = LinearizedCache(model)
    assert [type(layer).__name__ for layer in cache.layers] == ["LinearizedLayer", "DynamicSlidingWindowLayer"] * 2
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids).logits
        steps = [model(ids[:, :20], cache=cache).logits] + [model(ids[:, i:i + 1], cache=cache).logits
                                                             for i in range(20, 60)]
    torch.testing.assert_close(torch.cat(steps, 1), reference, rtol=1e-4, atol=1e-4)
    assert cache.layers[1].keys.shape[2] == 23  # the window, not every token


def test_a_crop_after_assisted_steps_keeps_what_the_next_token_needs():
    """transformers records the past (activate_past_recording) before assisted / prompt-lookup decoding, whose
    verification steps a crop may roll back: a sliding layer drops no page until that crop; without the recording,
    a crop that would need dropped tokens is refused rather than computing without them."""
    model = model_of("mistral")
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids[:, :53]).logits[:, -1]
        cache = GEARCache(model.config, **SMALL)
        model(ids[:, :50], cache=cache)
        cache.activate_past_recording()
        model(ids[:, 50:55], cache=cache)  # five candidates verified...
        cache.crop(-3)  # ...three rejected: 52 tokens, the next one needs those from 29 on
        assert all(layer.evicted <= 29 for layer in cache.layers)
        torch.testing.assert_close(model(ids[:, 52:53], cache=cache).logits[:, -1], reference, rtol=0, atol=3e-3)
        unrecorded = GEARCache(model.config, **SMALL)
        model(ids[:, :55], cache=unrecorded)
        with pytest.raises(ValueError, match="needs those from 29 on"):
            unrecorded.crop(-3)
    base = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    prompt = base.repeat(1, 4)  # repeated text: prompt lookup proposes candidates, some rejected
    gen = dict(max_new_tokens=60, do_sample=False, pad_token_id=0)
    looked_up = model.generate(prompt, cache=GEARCache(model.config, **SMALL), prompt_lookup_num_tokens=6, **gen)
    assert torch.equal(looked_up, model.generate(prompt, **gen))


def test_memory_benchmark_rows_stay_flat_on_the_sliding_model_and_grow_without_its_window():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "kv_sliding_memory.py"
    spec = importlib.util.spec_from_file_location("kv_sliding_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {(r["attention"], r["cache"], r["tokens"]): r for r in bench.rows(1024, [2048, 4096], layers=1)}
    for cache in bench.CACHES:
        short, long = rows[("sliding", cache, 2048)], rows[("sliding", cache, 4096)]
        assert long["ours_bytes"] == pytest.approx(short["ours_bytes"], rel=0.05) and long["ratio"] < 0.5
        assert long["transformers_bytes"] == short["transformers_bytes"]  # window - 1 tokens
        full_short, full_long = rows[("full", cache, 2048)], rows[("full", cache, 4096)]
        assert full_long["ours_bytes"] == pytest.approx(2 * full_short["ours_bytes"], rel=0.05)

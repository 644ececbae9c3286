"""kvcache/served.py: the logits of a text read through a GEARCache fed in chunks of residual_length, from one
forward. The reference is the chunked path itself (`quality.chunked_logits`), in float64 so that round-off cannot
move a value across a quantization step (in float32 a flipped code here and there is the whole difference)."""
from __future__ import annotations

import pytest
import torch

from compress.evaluate import logits_as_served
from compress.kvcache import GEARCache, KVCacheSettings
from compress.kvcache.quality import chunked_logits
from compress.kvcache.served import served_logits

SETTINGS = {
    "kivi-2": dict(method="kivi", bits=2),
    "gear-4 pages of 2 chunks": dict(method="gear", bits=4, key_rank=2, value_rank=1, outlier_ratio=0.1,
                                     page_chunks=2, key_prefill_rank=3),
    "gear-3 skip layer 1": dict(method="gear", bits=3, skip_layers=[1], value_bits=4),
}


def chunked(model, ids, settings):
    with torch.no_grad():
        return chunked_logits(model, ids, lambda: GEARCache(model.config, settings), settings.residual_length)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("impl", ["sdpa", "gear_kv"])
def test_one_forward_gives_the_chunked_logits(tiny_model, arch, name, impl):
    model = tiny_model(arch).double()
    model.set_attn_implementation(impl)
    settings = KVCacheSettings.build(group_size=16, residual_length=16, **SETTINGS[name])
    ids = torch.randint(0, 128, (2, 90), generator=torch.Generator().manual_seed(0))  # 5 chunks and 10 tokens
    want = chunked(model, ids, settings)
    got = served_logits(model, ids, settings)
    effect = (want - model(ids).logits).abs()
    assert effect.max() > 1e-3  # (the cache changes the logits: the test can fail)
    if impl == "sdpa":
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    else:  # gear_kv's chunked path reads the past in float32 (its torch reference kernel): float32 round-off, and
        # with it a code flipped here and there in the next layers
        assert (got - want).abs().mean() < 1e-3 * effect.mean()
    assert model.config._attn_implementation == impl  # put back


def test_text_within_one_chunk_and_the_chunk_boundaries(tiny_model):
    model = tiny_model("llama").double()
    settings = KVCacheSettings.build(method="kivi", bits=2, group_size=16, residual_length=16)
    for length in (1, 15, 16, 17, 32, 33):
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
        torch.testing.assert_close(served_logits(model, ids, settings), chunked(model, ids, settings), rtol=0,
                                   atol=1e-10)


def test_float32_differs_by_round_off_only(tiny_model):
    model = tiny_model("llama")
    settings = KVCacheSettings.build(method="gear", bits=4, group_size=16, residual_length=16)
    ids = torch.randint(0, 128, (2, 90), generator=torch.Generator().manual_seed(0))
    got, want = served_logits(model, ids, settings), chunked(model, ids, settings)
    effect = (want - model(ids).logits).abs().mean()
    assert (got - want).abs().mean() < 1e-2 * effect


def test_sliding_window_models_take_the_chunked_path(tiny_model, monkeypatch):
    model = tiny_model("mistral", sliding_window=32)
    settings = KVCacheSettings.build(method="kivi", bits=4, group_size=16, residual_length=16)
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(0))
    assert served_logits(model, ids, settings) is None
    model.kv_cache_settings = settings
    torch.testing.assert_close(logits_as_served(model, ids), chunked(model, ids, settings), rtol=0, atol=0)


def test_logits_as_served_uses_one_forward(tiny_model, monkeypatch):
    import compress.kvcache.quality as quality

    model = tiny_model("llama")
    model.kv_cache_settings = KVCacheSettings.build(method="kivi", bits=4, group_size=16, residual_length=16)
    monkeypatch.setattr(quality, "chunked_logits", lambda *a, **k: pytest.fail("the chunked path ran"))
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    logits_as_served(model, torch.randint(0, 128, (2, 50)))
    assert calls == [1]


def test_an_error_in_the_forward_restores_the_attention(tiny_model):
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    settings = KVCacheSettings.build(method="kivi", bits=4, group_size=16, residual_length=16)
    with pytest.raises(IndexError):
        served_logits(model, torch.full((1, 40), 10_000), settings)  # an id outside the vocabulary
    assert model.config._attn_implementation == "sdpa"


def test_keys_beyond_float16_are_refused_on_the_prompt(tiny_model):
    from compress.errors import CompressError

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight.mul_(1e6)  # bf16/float32 hold it, float16 does not
    cache = GEARCache(model.config, method="kivi", bits=4, group_size=16, residual_length=16)
    with pytest.raises(CompressError, match="layer 1's attention keys/values reach .* beyond float16's range"):
        model(torch.randint(0, 128, (1, 40)), cache=cache, use_cache=True)


def _keys_blow_up_from(model, position: int):
    """A hook on the last layer's k_proj: keys past float16's range from `position` on (bf16/float32 hold them).
    The last layer: a NaN it causes reaches no later layer's check on the prompt."""
    seen = [0]

    def hook(module, args, out):
        start, seen[0] = seen[0], seen[0] + out.shape[1]
        out = out.clone()
        out[:, max(0, position - start):] *= 1e6
        return out

    return model.model.layers[-1].self_attn.k_proj.register_forward_hook(hook)


@pytest.mark.parametrize("every_call", [True, False], ids=["cpu: every call", "accelerator: each chunk"])
def test_keys_beyond_float16_in_decoding_are_refused(tiny_model, monkeypatch, every_call):
    """Past the prompt: on the CPU at the token itself; where a check is a sync, once per compressed chunk, so at
    the latest when the token leaves the fp16 window (here the window holds 16 tokens: the prompt leaves 8)."""
    from compress.errors import CompressError
    from compress.kvcache import cache as cache_module

    monkeypatch.setattr(cache_module, "_checks_every_call", lambda device: every_call)
    model = tiny_model("llama")
    hook = _keys_blow_up_from(model, 40)  # the prompt is 40 tokens: the first decoded token overflows
    cache = GEARCache(model.config, method="kivi", bits=4, group_size=16, residual_length=16)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    refused_at = None
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        for step in range(16):
            try:
                model(torch.tensor([[5]]), cache=cache, use_cache=True)
            except CompressError as e:
                assert "beyond float16's range" in str(e)
                refused_at = step
                break
    hook.remove()
    assert refused_at == (0 if every_call else 7)  # 8 tokens in the window + 8 decoded fill its 16: one chunk


@pytest.mark.parametrize("every_call", [True, False], ids=["cpu", "accelerator"])
def test_keys_beyond_float16_after_the_first_chunk_are_refused_in_one_forward(tiny_model, monkeypatch, every_call):
    """The one-pass scoring stores a text chunk by chunk: a chunk past the first is checked too."""
    from compress.errors import CompressError
    from compress.kvcache import cache as cache_module

    monkeypatch.setattr(cache_module, "_checks_every_call", lambda device: every_call)
    model = tiny_model("llama")
    settings = KVCacheSettings.build(method="kivi", bits=4, group_size=16, residual_length=16)
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(0))
    hook = _keys_blow_up_from(model, 40)
    try:
        with pytest.raises(CompressError, match="beyond float16's range"):
            served_logits(model, ids, settings)
    finally:
        hook.remove()


def test_the_quality_summary_scores_the_same_in_one_forward(tiny_model):
    """compress eval / apply's KV rows (cache_quality_summary -> kv_quality with settings): the same figures as the
    chunked passes."""
    from compress.kvcache.quality import kv_quality

    model = tiny_model("llama").double()
    settings = KVCacheSettings.build(method="gear", bits=2, group_size=16, residual_length=16)
    windows = torch.randint(0, 128, (3, 70), generator=torch.Generator().manual_seed(0))
    make = lambda: GEARCache(model.config, settings)  # noqa: E731
    fast, _ = kv_quality(model, windows, make, 16, settings=settings)
    slow, _ = kv_quality(model, windows, make, 16)
    assert fast.kl > 1e-6
    for field in ("ppl", "ppl_reference", "kl", "top1_agreement"):
        assert getattr(fast, field) == pytest.approx(getattr(slow, field), rel=1e-9, abs=1e-12), field


def test_a_model_that_ignores_the_attention_switch_takes_the_chunked_path(tiny_model):
    """transformers' older attention code only warns on set_attn_implementation: its forward would give the plain
    logits, as if no cache were read."""
    model = tiny_model("llama")
    model.set_attn_implementation = lambda name: None
    settings = KVCacheSettings.build(method="kivi", bits=2, group_size=16, residual_length=16)
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(0))
    assert served_logits(model, ids, settings) is None
    model.kv_cache_settings = settings
    torch.testing.assert_close(logits_as_served(model, ids), chunked(model, ids, settings), rtol=0, atol=0)


def test_nan_values_are_refused_with_finite_keys(tiny_model):
    from compress.errors import CompressError
    from compress.kvcache.cache import _check_fp16_range

    keys, values = torch.ones(1, 2, 4, 16), torch.ones(1, 2, 4, 16)
    values[0, 1, 2, 3] = float("nan")
    with pytest.raises(CompressError, match="reach nan"):
        _check_fp16_range(keys, values)
    _check_fp16_range(keys, torch.ones(1, 2, 4, 16))


def test_the_quality_block_takes_the_feed_where_the_switch_is_ignored(tiny_model):
    """served_logits says None for a model whose attention ignores the switch; kv_quality then fed the chunks
    itself (it indexed None)."""
    from compress.kvcache.quality import kv_quality

    model = tiny_model("llama").double()
    model.set_attn_implementation = lambda name: None
    settings = KVCacheSettings.build(method="kivi", bits=2, group_size=16, residual_length=16)
    windows = torch.randint(0, 128, (2, 50), generator=torch.Generator().manual_seed(0))
    make = lambda: GEARCache(model.config, settings)  # noqa: E731
    got, _ = kv_quality(model, windows, make, 16, settings=settings)
    want, _ = kv_quality(model, windows, make, 16)
    assert got.kl > 1e-6 and got.kl == pytest.approx(want.kl, rel=1e-9)

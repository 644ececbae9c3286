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


def test_output_attentions_reads_the_compressed_past(lm, heldout_ids, attn):
    """output_attentions with the gear_kv attention: every layer's weights, equal to eager attention's over the
    dense reconstruction of the same cache (sdpa's None dropped every layer's entry)."""
    ids = torch.cat([heldout_ids[:, :150], heldout_ids[:, 300:450]])
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # left padding
    runs = {}
    for implementation in ("eager", "gear_kv"):
        attn(implementation)
        out = lm.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                          cache=GEARCache(lm.config, bits=4, key_rank=1, value_rank=0, outlier_ratio=0.02),
                          output_attentions=True, return_dict_in_generate=True)
        runs[implementation] = out
    assert torch.equal(runs["eager"].sequences, runs["gear_kv"].sequences)
    for eager, ours in zip(runs["eager"].attentions, runs["gear_kv"].attentions):  # prompt, then 2 decode steps
        assert len(ours) == lm.config.num_hidden_layers
        for e, o in zip(eager, ours):
            assert o.shape == e.shape and torch.allclose(o.float(), e.float(), atol=1e-4)
    assert runs["gear_kv"].attentions[-1][0][1, :, :, :20].abs().max() == 0  # padding gets no weight


def test_torch_compile_runs_the_compressed_attention_eagerly(tiny_model):
    """torch.compile over a model whose attention reads the packed cache: the same logits as without it (Dynamo
    failed inside the page-layout check before)."""
    from compress.kvcache import use_compressed_attention

    model = use_compressed_attention(tiny_model("llama", num_hidden_layers=1))
    ids = torch.randint(0, model.config.vocab_size, (1, 41), generator=torch.Generator().manual_seed(0))

    def prefill_and_step(forward):
        cache = GEARCache(model.config, method="kivi", bits=8, residual_length=16, group_size=16)
        with torch.no_grad():
            first = forward(input_ids=ids[:, :40], cache=cache, use_cache=True).logits
            step = forward(input_ids=ids[:, 40:], cache=cache, use_cache=True).logits  # reads 2 packed chunks
        return first, step
    eager = prefill_and_step(model.forward)
    compiled = prefill_and_step(torch.compile(model.forward, backend="eager"))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(compiled, eager))

"""The KV-quality protocol and the copy probe on the reference model."""
import pytest
import torch
from transformers import DynamicCache

from compress.errors import CompressError
from compress.kvcache import GEARCache
from compress.kvcache.quality import compare_caches, copy_accuracy, copy_sequences, heldout_windows, kv_quality


def test_protocol_orders_configurations(lm, reference_tokenizer, attn):
    from compress.calibration import builtin_text

    attn("gear_kv")
    windows = heldout_windows(reference_tokenizer, builtin_text("builtin:heldout"), 2, 256)
    same, ref = kv_quality(lm, windows, lambda: DynamicCache(config=lm.config), 64)
    assert same.kl < 1e-6 and same.top1_agreement == 1.0 and abs(same.ppl_delta_pct) < 1e-3
    assert same.tokens_scored == 2 * (256 - 64 - 1)
    q8, _ = kv_quality(lm, windows, lambda: GEARCache(lm.config, method="kivi", bits=8), 64, ref)
    q2, _ = kv_quality(lm, windows, lambda: GEARCache(lm.config, method="kivi", bits=2), 64, ref)
    assert q8.kl < q2.kl and q8.top1_agreement >= q2.top1_agreement and q8.top1_agreement > 0.98
    assert q2.kl > 0  # earlier chunks really were compressed before later tokens were scored
    lo, hi = q2.ppl_delta_pct_ci95  # intervals over the 2 windows, around the point figures
    assert q2.windows == 2 and lo < q2.ppl_delta_pct < hi and q2.kl_ci95[0] <= q2.kl < q2.kl_ci95[1]
    assert 100 * (q2.ppl / q2.ppl_reference - 1) == pytest.approx(q2.ppl_delta_pct, rel=1e-9)
    paired = compare_caches(q8, q2)  # window by window: the ratios of the two results' own figures
    assert paired["kl_ratio"] == pytest.approx(q8.kl / q2.kl, rel=1e-6)
    assert paired["ppl_ratio"] == pytest.approx(q8.ppl / q2.ppl, rel=1e-9)
    assert paired["ppl_ratio_ci95"][0] < paired["ppl_ratio"] < paired["ppl_ratio_ci95"][1]
    assert compare_caches(q2, q2)["ppl_ratio_ci95"] == pytest.approx([1.0, 1.0])
    # scored window by window with nothing kept (what `compress eval` does): the same result, no reference held
    lean, none = kv_quality(lm, windows, lambda: GEARCache(lm.config, method="kivi", bits=2), 64, keep_reference=False)
    assert none is None and lean.window_nll == pytest.approx(q2.window_nll, rel=1e-9)
    assert lean.kl == pytest.approx(q2.kl, rel=1e-9) and lean.top1_agreement == q2.top1_agreement
    with pytest.raises(CompressError, match="no KL to the reference"):  # a ratio to the reference is undefined
        compare_caches(q8, same)


def test_copy_probe(lm, attn):
    attn("gear_kv")
    seqs = copy_sequences(2, 80, lm.config.vocab_size)
    assert torch.equal(seqs[:, :80], seqs[:, 80:])
    ref = copy_accuracy(lm, seqs, lambda: DynamicCache(config=lm.config), 64)
    if ref < 0.5:
        pytest.skip(f"the reference model does not copy in context (accuracy {ref:.2f}): the probe cannot tell "
                    "caches apart on it")
    ours = copy_accuracy(lm, seqs, lambda: GEARCache(lm.config, method="kivi", bits=8), 64)
    assert 0.0 <= ref <= 1.0 and abs(ours - ref) <= 1 / 79 + 1e-6


def test_a_text_shorter_than_the_summary_windows_is_one_window(lm, reference_tokenizer):
    """`compress eval --text` of 360 tokens on a gear_kv model was refused ("fewer than one window of 512", a
    length the user never chose); it is scored as one window, and a text too short for the check says why."""
    from compress.calibration import builtin_text
    from compress.kvcache import KVCacheSettings
    from compress.kvcache.quality import cache_quality_summary, check_summary_text

    ids = reference_tokenizer(builtin_text("builtin:heldout"), verbose=False).input_ids
    short, tiny = reference_tokenizer.decode(ids[1:361]), reference_tokenizer.decode(ids[1:81])
    tokens = len(reference_tokenizer(short, verbose=False).input_ids)
    settings = KVCacheSettings.build(method="kivi", bits=4)
    check_summary_text(reference_tokenizer, short, 64, lm.config)
    summary = cache_quality_summary(lm, reference_tokenizer, settings, short, None)
    assert summary["windows"] == 1 and summary["tokens_scored"] == tokens - 64 - 1
    # a text of two and a half windows: 2 windows, not 16 near copies of one
    longer = reference_tokenizer.decode(ids[1:1300])
    two = cache_quality_summary(lm, reference_tokenizer, settings, longer, None)
    assert two["windows"] == 2 and two["protocol"].startswith("2 windows of 512 tokens")
    assert summary["protocol"].startswith(f"1 window of {tokens} tokens")
    with pytest.raises(CompressError, match="the KV-cache check scores the tokens after the first 64 .* at least 97"):
        check_summary_text(reference_tokenizer, tiny, 64, lm.config)


def test_a_short_context_asks_for_a_text_it_can_take():
    """Residual 40 in a 64-token context: windows are 64 tokens (the context), so that is what a text needs, not
    40 + 33 = 73 tokens, more than the context holds."""
    from compress.kvcache.quality import summary_window_len

    assert summary_window_len(40, 64, 64) == 64
    with pytest.raises(CompressError, match="give a text of at least 64 tokens"):
        summary_window_len(40, 64, 60)
    assert summary_window_len(64, 1024, 300) == 300  # one window of the whole text
    assert summary_window_len(64, 1024, None) == 512

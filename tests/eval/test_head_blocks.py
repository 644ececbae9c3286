"""`evaluate` scores final hidden states with the head applied a block of positions at a time: the same figures as
whole logits, without [windows, tokens, vocabulary] float32 tensors for the model and the baseline at once."""
from __future__ import annotations

import pytest
import torch

import compress
from compress import evaluate as ev
from compress.kvcache.cache import GEARCache
from compress.kvcache.quality import chunked_logits


def whole_logit_figures(model, windows, baseline, served):
    """The reference: whole float32 logits of every window, scored at once."""
    acc, base_acc = ev.MetricAccumulator(), ev.MetricAccumulator()
    with torch.no_grad():
        if served:
            s = model.kv_cache_settings
            logits = chunked_logits(model, windows, lambda: GEARCache(model.config, s), s.residual_length)
        else:
            logits = model(input_ids=windows).logits.float()
        base = baseline(input_ids=windows).logits.float()
    acc.add(logits[:, :-1], windows[:, 1:], base[:, :-1])
    base_acc.add(base[:, :-1], windows[:, 1:])
    return {**acc.result(True), "baseline_perplexity": base_acc.result(False)["perplexity"],
            **ev.paired_change(acc, base_acc)}


@pytest.mark.parametrize("recipe", ["prune", "vq_logits", "gear_kv"])
def test_blocks_of_positions_give_the_whole_logits_figures(recipe, tmp_path, monkeypatch, reference_tokenizer):
    passes = {"prune": [compress.get_pass("prune")(method="magnitude", sparsity=0.5)],
              "vq_logits": [compress.get_pass("vq_logits")(num_codes=256, kmeans_iterations=5)],
              "gear_kv": [compress.get_pass("gear_kv")(method="kivi", bits=2, residual_length=32,
                                                       group_size=32)]}[recipe]
    baseline = compress.load("builtin:tiny", dtype="float32")
    model, _ = compress.apply(compress.load("builtin:tiny", dtype="float32"), passes, tokenizer=reference_tokenizer,
                              calibration={"source": "builtin:calibration", "num_samples": 4, "seq_len": 64},
                              progress=False)
    windows = ev.heldout_windows(reference_tokenizer, seq_len=128, max_windows=3)
    want = whole_logit_figures(model, windows, baseline, served=recipe == "gear_kv")
    heads = []  # the positions each head call sees: one in a forward, a block when scoring
    for m in (model, baseline):
        m.get_output_embeddings().register_forward_hook(lambda mod, args, out: heads.append(args[0].shape[:2]))
    monkeypatch.setattr(ev, "HEAD_BLOCK_ELEMENTS", 2 * 50 * 8192)  # 2 windows x 50 positions: 3 blocks a batch
    got = ev.evaluate(model, windows, baseline, batch_size=2, progress=False)
    assert {tuple(s) for s in heads} <= {(2, 1), (1, 1), (2, 50), (2, 27), (1, 100), (1, 27)}, heads
    for key in ("perplexity", "baseline_perplexity", "kl", "top1_agreement"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), key
    # a difference of two perplexities, in percent: their 1e-5 carried into it is up to 2e-3 points (float32 head
    # blocks sum in another order than the whole head; on an AMX Xeon the delta moved by 1.6e-5 points)
    assert got["ppl_delta_pct"] == pytest.approx(want["ppl_delta_pct"], abs=2e-3)
    assert got["ppl_delta_pct_ci95"] == pytest.approx(want["ppl_delta_pct_ci95"], abs=2e-3)
    assert got["kl"] > 0 and got["tokens"] == 3 * 127


def test_a_module_that_is_not_a_transformers_model_takes_whole_logits(reference_tokenizer):
    """A plain module around a model (no get_output_embeddings / get_decoder) is scored from its logits."""
    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    model = compress.load("builtin:tiny", dtype="float32")
    windows = ev.heldout_windows(reference_tokenizer, seq_len=64, max_windows=2)
    got = ev.evaluate(Wrap(model), windows, model, progress=False)
    assert got["kl"] == pytest.approx(0, abs=1e-9) and got["perplexity"] == pytest.approx(
        ev.evaluate(model, windows, progress=False)["perplexity"], rel=1e-6)


@pytest.mark.parametrize("one_forward", ["not covered", "tried, then chunks"])
def test_a_cache_scored_chunk_by_chunk_gives_the_hidden_states_of_the_chunks(one_forward, monkeypatch,
                                                                            reference_tokenizer):
    """Where served.py does not cover the model (sliding windows), or finds after its forward that the cache was not
    read, the chunks' hidden states alone are scored: the same figures as the chunked whole logits."""
    from compress.kvcache import served

    model, _ = compress.apply(compress.load("builtin:tiny", dtype="float32"),
                              [compress.get_pass("gear_kv")(method="kivi", bits=2, residual_length=32, group_size=32)],
                              progress=False)
    baseline = compress.load("builtin:tiny", dtype="float32")
    windows = ev.heldout_windows(reference_tokenizer, seq_len=128, max_windows=2)
    want = whole_logit_figures(model, windows, baseline, served=True)
    if one_forward == "not covered":
        monkeypatch.setattr(served, "served_in_one_pass", lambda m: False)
    else:
        monkeypatch.setattr(served, "served_logits", lambda m, ids, s: m(input_ids=ids, use_cache=False) and None)
    assert ev.hidden_as_served(model, windows).shape[:2] == windows.shape
    got = ev.evaluate(model, windows, baseline, progress=False)
    for key in ("perplexity", "kl", "top1_agreement"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), key

"""LLM-KICK on the reference model that retrieves (builtin:small): what 70% magnitude pruning does to in-context
retrieval at the model's full context, against what perplexity says.

builtin:tiny cannot retrieve (its pass-key and copy scores are 0 before pruning), so tests/eval/test_suite.py checks
the generation side of the finding there; builtin:small finds a pass key in 2,000 tokens of held-out text about a third
of the time, which is enough for the drop to be measured."""
from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

import compress  # noqa: E402
from compress.eval.suite import run_suite  # noqa: E402
from compress.evaluate import evaluate, heldout_windows  # noqa: E402


def test_pruning_hurts_long_context_retrieval_more_than_perplexity_says(small_model):
    tokenizer = compress.load_tokenizer("builtin:small")
    pruned = compress.load("builtin:small", dtype="float32")
    pruned, _ = compress.apply(pruned, [compress.passes.Prune(method="magnitude", sparsity=0.7)], progress=False)
    quality = evaluate(pruned, heldout_windows(tokenizer, seq_len=256, max_windows=8), small_model, progress=False)
    ppl_retained = quality["baseline_perplexity"] / quality["perplexity"]  # geometric-mean token probability ratio
    # 8 of the 16 prompts (one batch of 2,000-token sequences per model: the test's cost is these forwards)
    out = run_suite(pruned, tokenizer, small_model, tasks=["passkey_2000"], limit=8)
    base, ours = out["baseline"]["passkey_2000"], out["model"]["passkey_2000"]
    assert base >= 0.2, out  # the reference model retrieves at 2k tokens (2 of these 8, 5 of all 16), so a drop shows
    assert 0.1 < ppl_retained < 0.6, quality  # perplexity: a large but finite loss ...
    assert ours / base < 0.5 * ppl_retained, (out, quality)  # ... retrieval at full context: a far larger one

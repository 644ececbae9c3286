"""The evaluation suite on the built-in reference model: perfect against itself, scores that match an independent
computation, the LLM-KICK finding on a 70%-magnitude-pruned model, and deterministic fixtures."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

import compress  # noqa: E402
from compress.eval.agreement import agreement_scores  # noqa: E402
from compress.eval.lm_eval_tasks import DATA_DIR  # noqa: E402
from compress.eval.suite import read_rows, run_suite  # noqa: E402
from compress.evaluate import evaluate, heldout_windows  # noqa: E402

LIMIT = 4  # examples per lm-eval task: enough to compare, small enough for the CPU


@pytest.fixture(scope="module")
def pruned_70(reference_model):
    model = compress.load("builtin:tiny")
    model, _ = compress.apply(model, [compress.passes.Prune(method="magnitude", sparsity=0.7)], progress=False)
    return model


def test_uncompressed_model_scores_perfectly_against_itself(reference_model, reference_tokenizer):
    out = run_suite(reference_model, reference_tokenizer, reference_model, limit=LIMIT,
                    tasks=["agreement_kl", "agreement_top1", "agreement_greedy", "mc", "copy"])
    model, base = out["model"], out["baseline"]
    assert model["agreement_top1"] == 1.0 and model["agreement_greedy"] == 1.0
    assert abs(model["agreement_kl"]) < 1e-9
    assert model == pytest.approx(base, abs=1e-9)  # every task: the same score as the baseline
    assert list(model) == ["agreement_kl", "agreement_top1", "agreement_greedy", "copy", "mc"]
    # lm-eval's tasks get a Wilson interval over their LIMIT examples (by hand: z = 1.96)
    p, n, z = model["mc"], LIMIT, 1.959964
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    assert out["model_ci95"]["mc"] == pytest.approx([max(centre - half, 0), min(centre + half, 1)], abs=1e-9)
    assert out["baseline_ci95"]["mc"] == out["model_ci95"]["mc"] and "copy" not in out["model_ci95"]
    lo, hi = out["model_ci95"]["mc"]
    assert hi - lo > 0.2  # 4 examples say little, whatever the score (not zero-width at 0 or 1)


def direct_multiple_choice(model, tokenizer, rows, per_char: bool = False) -> float:
    """Accuracy by summed log-likelihood of each option after the context (divided by the option's length in
    characters: `per_char`), computed here without lm-eval."""
    return sum(direct_choices(model, tokenizer, rows, per_char)) / len(rows)


def direct_choices(model, tokenizer, rows, per_char: bool = False) -> list[bool]:
    """Per row: the option of highest summed (per character: `per_char`) log-likelihood after the context is the
    label."""
    hits = []
    for row in rows:
        ctx = tokenizer(row["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in row["choices"]:
            whole = tokenizer(row["context"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            cont = torch.tensor(whole[len(ctx):])
            scores.append(logp[len(ctx) - 1:-1].gather(-1, cont[:, None]).sum().item() / (len(choice) if per_char
                                                                                          else 1))
        hits.append(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    return hits


def direct_greedy_span(model, tokenizer, rows) -> float:
    """Share of rows whose answer span is the model's greedy continuation, computed here without lm-eval."""
    hits = 0
    for row in rows:
        ctx = tokenizer(row["context"], add_special_tokens=False)["input_ids"]
        whole = tokenizer(row["context"] + " " + row["answer"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            pred = model(torch.tensor([whole])).logits[0, len(ctx) - 1:-1].argmax(-1)
        hits += int(torch.equal(pred, torch.tensor(whole[len(ctx):])))
    return hits / len(rows)


def test_lm_eval_scores_match_a_direct_computation(pruned_70, reference_tokenizer):
    out = run_suite(pruned_70, reference_tokenizer, limit=LIMIT, tasks=["mc", "mc_norm", "cloze_closed"])
    assert out["baseline"] is None
    assert out["model"]["mc"] == direct_multiple_choice(pruned_70, reference_tokenizer,
                                                        read_rows(DATA_DIR / "mc.jsonl")[:LIMIT])
    assert out["model"]["mc_norm"] == direct_multiple_choice(pruned_70, reference_tokenizer,
                                                             read_rows(DATA_DIR / "mc.jsonl")[:LIMIT], per_char=True)
    assert out["model"]["cloze_closed"] == direct_greedy_span(pruned_70, reference_tokenizer,
                                                              read_rows(DATA_DIR / "cloze_closed.jsonl")[:LIMIT])


def test_lm_eval_span_tasks_match_a_direct_computation_on_a_model_that_retrieves(small_model):
    """On builtin:small the pass-key and open-book cloze answers are found often enough that a mis-scored
    continuation (e.g. without the space before the answer) shows as a mismatch, not as 0 == 0."""
    tokenizer = compress.load_tokenizer("builtin:small")
    out = run_suite(small_model, tokenizer, limit=8, tasks=["passkey_256", "cloze_open"])
    for task in ("passkey_256", "cloze_open"):
        direct = direct_greedy_span(small_model, tokenizer, read_rows(DATA_DIR / f"{task}.jsonl")[:8])
        assert out["model"][task] == direct, (task, out["model"][task], direct)
    assert out["model"]["passkey_256"] >= 0.5


def test_paired_change_against_the_baseline_by_hand(pruned_70, reference_model, reference_tokenizer):
    """The suite's model-minus-baseline interval pairs the two models' outcomes on the same documents: it equals
    paired_proportion_difference over per-row outcomes computed here without lm-eval."""
    from compress.intervals import paired_proportion_difference

    out = run_suite(pruned_70, reference_tokenizer, reference_model, limit=12, tasks=["mc"])
    rows = read_rows(DATA_DIR / "mc.jsonl")[:12]
    ours, base = (direct_choices(m, reference_tokenizer, rows) for m in (pruned_70, reference_model))
    assert out["model"]["mc"] - out["baseline"]["mc"] == pytest.approx((sum(ours) - sum(base)) / 12)
    assert out["change_ci95"]["mc"] == pytest.approx(paired_proportion_difference(ours, base), abs=1e-12)
    assert run_suite(pruned_70, reference_tokenizer, limit=4, tasks=["mc"])["change_ci95"] == {}  # no baseline
    # a baseline scored in an earlier run pairs through its per-document outcomes (benchmarks/eval_suite.py)
    earlier = run_suite(reference_model, reference_tokenizer, limit=12, tasks=["mc"])
    again = run_suite(pruned_70, reference_tokenizer, reference_model, limit=12, tasks=["mc"],
                      baseline_scores=earlier["model"], baseline_per_doc=earlier["model_per_doc"])
    assert again["change_ci95"] == out["change_ci95"]
    assert run_suite(pruned_70, reference_tokenizer, reference_model, tasks=["copy"])["change_ci95"] == {}  # no lm-eval


def test_a_baseline_whose_tokenizer_gives_other_ids_is_refused(reference_model, reference_tokenizer, tiny_model,
                                                              tmp_path):
    """The suite scores both models on the ids the model's tokenizer cuts: a baseline whose tokenizer has the same
    size but its tokens in another order was scored on the wrong ids (an audit's find). Refused before any work,
    whether its tokenizer is given or found where compress.load read the baseline; one without tokenizer files has
    nothing to compare."""
    from transformers import AutoTokenizer

    from compress.errors import CompressError

    folder = compress.save(tiny_model("llama", vocab_size=8192), tmp_path / "b", tokenizer=reference_tokenizer)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == n) for n in (300, 301))
    vocab[a], vocab[b] = 301, 300
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    baseline = compress.load(folder)
    for given in (None, AutoTokenizer.from_pretrained(folder)):
        with pytest.raises(CompressError, match="another tokenizer than the model: 2 of the 8192 tokens"):
            run_suite(reference_model, reference_tokenizer, baseline, tasks=["copy"], limit=1,
                      baseline_tokenizer=given)
    bare = compress.load(compress.save(tiny_model("llama", vocab_size=8192), tmp_path / "bare"))
    out = run_suite(reference_model, reference_tokenizer, bare, tasks=["copy"], limit=1)
    assert set(out["baseline"]) == {"copy"}


def test_tasks_longer_than_the_baseline_context_are_skipped(reference_model, reference_tokenizer, tiny_model):
    """Both models score the same prompts: a task longer than the baseline's context is skipped, and said so, as
    one longer than the model's is (a 512-token baseline was scored on passkey_1000 without a note: an audit's
    find)."""
    baseline = tiny_model("llama", vocab_size=8192, max_position_embeddings=512)
    out = run_suite(reference_model, reference_tokenizer, baseline, tasks=["passkey_1000", "copy"], limit=1)
    assert out["skipped"] == {"passkey_1000": "prompts longer than the baseline's context (512 tokens)"}
    assert set(out["model"]) == set(out["baseline"]) == {"copy"}
    out = run_suite(baseline, reference_tokenizer, reference_model, tasks=["passkey_1000", "copy"], limit=1)
    assert out["skipped"] == {"passkey_1000": "prompts longer than the model's context (512 tokens)"}


def test_pruning_hurts_generation_more_than_perplexity_says(reference_model, reference_tokenizer, pruned_70):
    """LLM-KICK: perplexity moves little while what the model generates changes a lot. builtin:tiny cannot copy or
    retrieve (its pass-key, copy and open-book scores are ~0 before pruning), so the exact-match task here is the
    greedy continuation: the share of 16 greedy tokens that stay the baseline's."""
    windows = heldout_windows(reference_tokenizer, seq_len=256, max_windows=8)
    quality = evaluate(pruned_70, windows, reference_model, progress=False)
    ppl_retained = quality["baseline_perplexity"] / quality["perplexity"]  # geometric-mean token probability ratio
    agreement = agreement_scores(pruned_70, reference_model, reference_tokenizer, read_rows(DATA_DIR / "agreement.jsonl"))
    assert 0.6 < ppl_retained < 1.0, quality  # a modest perplexity increase ...
    assert agreement["agreement_greedy"] < 0.5 * ppl_retained, (agreement, quality)  # ... and greedy text diverges
    assert agreement["agreement_top1"] < 1.0 and agreement["agreement_kl"] > 0.01


def test_length_normalised_choice_is_its_own_score(reference_model, reference_tokenizer):
    """Summed log-likelihood favours the shortest option (builtin:tiny picks it 13 times in 24 by it); mc_norm
    (lm-eval's acc_norm: per character of the option) is reported beside mc, asked for alone runs mc once, and pairs
    with a baseline over its own per-document outcomes."""
    from compress.intervals import paired_proportion_difference

    rows = read_rows(DATA_DIR / "mc.jsonl")
    both = run_suite(reference_model, reference_tokenizer, tasks=["mc", "mc_norm"])
    assert both["model"]["mc"] == direct_multiple_choice(reference_model, reference_tokenizer, rows)
    assert both["model"]["mc_norm"] == direct_multiple_choice(reference_model, reference_tokenizer, rows, True)
    assert both["model"]["mc_norm"] != both["model"]["mc"]
    alone = run_suite(reference_model, reference_tokenizer, tasks=["mc_norm"], limit=8)
    assert list(alone["model"]) == ["mc_norm"] and list(alone["model_per_doc"]) == ["mc_norm"]
    model = compress.load("builtin:tiny")
    model, _ = compress.apply(model, [compress.passes.Prune(method="magnitude", sparsity=0.7)], progress=False)
    paired = run_suite(model, reference_tokenizer, reference_model, tasks=["mc_norm"], limit=12)
    ours, base = (direct_choices(m, reference_tokenizer, rows[:12], True) for m in (model, reference_model))
    assert paired["change_ci95"]["mc_norm"] == pytest.approx(paired_proportion_difference(ours, base), abs=1e-12)


def test_agreement_rows_score_the_same_tokens_whatever_the_limit(reference_tokenizer):
    """Rows were trimmed to the shortest row among those scored, so `--suite-limit` changed every row's tokens
    (the shipped rows are all one length in builtin:tiny's tokens; another model's tokenizer cuts them unevenly)."""
    from compress.eval.agreement import rectangular

    row = read_rows(DATA_DIR / "agreement.jsonl")[0]
    words = (row["context"] + " " + row["continuation"]).split()
    rows = [{"context": " ".join(words[:n]), "continuation": " ".join(words[n:2 * n])} for n in (30, 20, 10)]
    whole = rectangular(reference_tokenizer, rows)
    for limit in (1, 2):
        part = rectangular(reference_tokenizer, rows, limit)
        assert torch.equal(part[0], whole[0][:limit]) and torch.equal(part[1], whole[1][:limit])
    alone = rectangular(reference_tokenizer, rows[:1])  # what --suite-limit 1 scored before
    assert alone[0].shape[1] > whole[0].shape[1] and alone[1].shape[1] > whole[1].shape[1]


def test_fixture_script_rebuilds_the_shipped_files(tmp_path, script_module):
    script = script_module("scripts/build_eval_fixtures.py")
    script.main(["--out", str(tmp_path)])
    shipped = sorted(p.name for p in DATA_DIR.iterdir() if p.suffix in (".jsonl", ".yaml"))
    assert sorted(p.name for p in tmp_path.iterdir()) == shipped
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name
    passkey = read_rows(DATA_DIR / "passkey_256.jsonl")[0]
    assert f"The pass key is {passkey['answer']}." in passkey["context"]  # the probe's wording, the key in context
    assert all(json.loads(line)["label"] in range(4) for line in (DATA_DIR / "mc.jsonl").read_text().splitlines())
    assert len(read_rows(DATA_DIR / "cloze_open.jsonl")) == len(read_rows(DATA_DIR / "cloze_closed.jsonl")) == 24


def test_a_compressed_kv_cache_is_read_as_served(reference_model, reference_tokenizer):
    """lm-eval's log-likelihoods, the copy probe and the agreement scores ran one plain forward, which never reads a
    gear_kv cache: a KIVI-2 model scored against its own original agreed perfectly (KL 0). They read the cache now
    (text in chunks of residual_length through it), and lm-eval's scores are those of a direct computation that
    does the same."""
    import copy

    from compress.eval.suite import suite_protocol
    from compress.evaluate import logits_as_served
    from compress.kvcache.cache import GEARCache
    from compress.kvcache.quality import chunked_logits

    model = copy.deepcopy(reference_model)
    compress.apply(model, [compress.get_pass("gear_kv")(method="kivi", bits=2, group_size=32, residual_length=32)],
                   progress=False)
    ids = torch.randint(100, 8000, (2, 96), generator=torch.Generator().manual_seed(0))
    served = logits_as_served(model, ids)  # one forward (kvcache/served.py): the chunked logits up to round-off
    chunked = chunked_logits(model, ids, lambda: GEARCache(model.config, model.kv_cache_settings), 32)
    plain = logits_as_served(reference_model, ids)
    assert (served - chunked).abs().mean() < 1e-2 * (chunked - plain).abs().mean()
    assert not torch.allclose(served, plain, atol=1e-3)
    out = run_suite(model, reference_tokenizer, reference_model, limit=LIMIT, tasks=["agreement_kl", "copy", "mc"])
    assert out["model"]["agreement_kl"] > 1e-4  # the same weights: all of it is the cache's
    rows = read_rows(DATA_DIR / "mc.jsonl")[:LIMIT]
    hits = []
    for row in rows:  # each option's summed log-likelihood, read through the cache
        ctx = len(reference_tokenizer(row["context"], add_special_tokens=False)["input_ids"])
        scores = []
        for choice in row["choices"]:
            whole = reference_tokenizer(row["context"] + " " + choice, add_special_tokens=False)["input_ids"]
            logp = F.log_softmax(logits_as_served(model, torch.tensor([whole]))[0].double(), -1)
            scores.append(logp[ctx - 1:-1].gather(-1, torch.tensor(whole[ctx:])[:, None]).sum().item())
        hits.append(max(range(4), key=scores.__getitem__) == row["label"])
    assert out["model_per_doc"]["mc"] == {i: float(h) for i, h in enumerate(hits)}
    assert "a compressed KV cache read as served (text fed through it in chunks of 32)" in suite_protocol(
        DATA_DIR, LIMIT, (model, reference_model))


def test_mc_norm_is_found_and_skipped_under_its_own_name(reference_model, reference_tokenizer, tmp_path):
    """A suite folder's config that quotes `acc_norm` still gives `<task>_norm`; a skip is filed under the name asked
    for (mc_norm alone was skipped as `mc`). A reviewer's finds."""
    import copy
    import shutil

    from compress.eval.lm_eval_tasks import suite_task_names

    shutil.copytree(DATA_DIR, tmp_path / "suite")
    config = tmp_path / "suite" / "mc.yaml"
    config.write_text(config.read_text().replace("- metric: acc_norm", '- metric: "acc_norm"  # quoted')
                      .replace("task: kick_mc", 'task: "kick_mc"  # quoted too'))
    assert suite_task_names(tmp_path / "suite", "acc_norm") == ["kick_mc"]
    short = copy.deepcopy(reference_model)
    short.config.max_position_embeddings = 16  # shorter than any mc prompt
    out = run_suite(short, reference_tokenizer, tasks=["mc_norm"], limit=2)
    assert list(out["skipped"]) == ["mc_norm"] and out["model"] == {}

"""The vq_logits pass on the trained reference model (quality vs the dense head) and on random-init models of each
architecture (plumbing): errors, untying, generate, checkpoint round trip, the recipe through the CLI."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

import compress
from compress.errors import CalibrationError, CompressError, ConfigError
from compress.evaluate import evaluate, heldout_windows
from compress.pass_api import PassContext
from compress.vq_logits import VQLogits, VQLogitsHead

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "vq-logits.yaml"
SMALL_CALIB = {"source": "builtin:calibration", "num_samples": 32, "seq_len": 128}


@pytest.fixture(scope="module")
def heldout(reference_tokenizer):
    return heldout_windows(reference_tokenizer, seq_len=128, max_windows=12)


@pytest.fixture(scope="module")
def fitted(reference_model, reference_tokenizer):
    """K=128 heads on the reference model: plain copy, + scale/bias with a shortlist, + a short distillation."""
    out = {}
    for name, kwargs in {
        "copy": dict(scale_bias=False),
        "scale_bias": dict(shortlist=32),
        "distill": dict(shortlist=32, distill=True, distill_steps=25, distill_batch_size=128, distill_lr=3e-3),
    }.items():
        model = copy.deepcopy(reference_model)
        _, report = compress.apply(model, [VQLogits(num_codes=128, kmeans_iterations=8, **kwargs)],
                                   calibration=SMALL_CALIB, tokenizer=reference_tokenizer, progress=False)
        out[name] = (model, report.passes[0])
    return out


def test_scale_bias_beats_plain_copy_on_heldout_text(fitted, reference_model, heldout):
    q = {k: evaluate(m, heldout, reference_model, progress=False) for k, (m, _) in fitted.items()}
    base = evaluate(reference_model, heldout, progress=False)
    # measured (final model, K=128, 4k calibration tokens): KL copy 1.15, scale/bias 1.00, distill 0.81;
    # top-1 agreement 0.16, 0.53, 0.67
    assert q["scale_bias"]["kl"] < 0.95 * q["copy"]["kl"]
    assert q["distill"]["kl"] < 0.9 * q["scale_bias"]["kl"]
    assert q["scale_bias"]["perplexity"] < q["copy"]["perplexity"]
    assert q["scale_bias"]["top1_agreement"] > q["copy"]["top1_agreement"] + 0.2
    assert q["copy"]["perplexity"] > base["perplexity"] and q["copy"]["kl"] > 0.1   # the copy really loses a lot
    # distillation continues from the fit: lower KL on calibration data than where it started
    details = fitted["distill"][1].details
    assert details["calibration_kl_distill"] < details["calibration_kl_scale_bias"] < details["calibration_kl_copy"]


def test_shortlist_tokens_get_exact_dense_logits(fitted, reference_model, heldout):
    model, report = fitted["scale_bias"]
    head = model.lm_head
    assert isinstance(head, VQLogitsHead) and head.shortlist_size == 32
    h = torch.randn(3, 256)
    ids = head.shortlist_ids.long()
    dense = h @ reference_model.lm_head.weight[ids].t()
    assert torch.allclose(head(h)[:, ids], dense, atol=1e-5)
    others = torch.ones(8192, dtype=torch.bool)
    others[ids] = False
    assert not torch.allclose(head(h)[:, others], h @ reference_model.lm_head.weight[others].t(), atol=1e-3)
    # the shortlist is the most frequent calibration tokens, and the report says what the head holds
    assert report.details["head_float_params_after"] == 128 * 256 + 32 * 256 + 2 * 8192
    assert report.bytes_after < report.bytes_before / 5


def test_generate_greedy_matches_full_forward_and_sampling_runs(fitted, reference_tokenizer):
    model, _ = fitted["distill"]
    ids = reference_tokenizer("def main(", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    manual = ids
    with torch.no_grad():
        for _ in range(8):  # greedy decoding by full forward passes, no cache
            nxt = model(input_ids=manual, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            manual = torch.cat([manual, nxt], 1)
    assert torch.equal(out, manual)
    torch.manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=50, temperature=1.0)
    assert sampled.shape == (1, ids.shape[1] + 8) and int(sampled.max()) < 8192
    # the loss path: labels give a finite cross-entropy through the VQ head
    loss = model(input_ids=manual, labels=manual).loss
    assert torch.isfinite(loss)
    loss.backward()  # and gradients reach the codebook, scales and biases (the differentiable reference path)
    head = model.lm_head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (head.codebook, head.scales, head.biases))
    model.zero_grad(set_to_none=True)


def test_checkpoint_round_trip(fitted, tmp_path, heldout, reference_tokenizer):
    model, _ = fitted["scale_bias"]
    compress.save(model, tmp_path / "vq", tokenizer=reference_tokenizer)
    loaded = compress.load(tmp_path / "vq")
    head, orig = loaded.lm_head, model.lm_head
    assert isinstance(head, VQLogitsHead)
    assert head.codes.dtype == torch.uint8 and torch.equal(head.codes, orig.codes)
    assert torch.equal(head.shortlist_ids, orig.shortlist_ids)
    # floats are stored in bf16: the reloaded head equals the in-memory head with its floats rounded to bf16
    rounded = copy.deepcopy(orig)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    h = torch.randn(4, 256)
    assert torch.allclose(head(h), rounded(h), atol=1e-5)
    x = heldout[:2]
    # apply rounds the fitted floats to the checkpoint's bf16: in memory and reloaded compute the same
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)


def test_user_mistakes(reference_model, reference_tokenizer):
    model = copy.deepcopy(reference_model)
    with pytest.raises(ConfigError, match="smaller than the vocabulary"):
        VQLogits(num_codes=8192, scale_bias=False, weighting="uniform").apply(model, PassContext(progress=False))
    with pytest.raises(ConfigError, match="num_codes"):
        VQLogits(num_codes=1)
    with pytest.raises(ConfigError, match="exceeds the vocabulary"):
        VQLogits(num_codes=8000, shortlist=500).apply(model, PassContext(progress=False))
    with pytest.raises(CalibrationError, match="calibration"):
        VQLogits(num_codes=64).apply(model, PassContext(progress=False))
    with pytest.raises(CompressError, match="calibration"):
        compress.apply(model, [VQLogits(num_codes=64, distill=True)], tokenizer=reference_tokenizer)
    with pytest.raises(ConfigError, match="scale_bias"):
        VQLogits(distill=True, scale_bias=False)
    with pytest.raises(ConfigError, match="weighting"):
        VQLogits(weighting="zipf")
    with pytest.raises(ConfigError, match="down_proj, which is not the model's output head \\(lm_head\\)"):
        VQLogits(num_codes=16, targets=["model.layers.0.mlp.down_proj"]).check(model)
    with pytest.raises(ConfigError, match=r"matched \d+: model, model.embed_tokens, model.layers and \d+ more$"):
        VQLogits(num_codes=16, targets=["re:.*"]).check(model)  # (it listed all 84 names on one line)
    assert isinstance(model.lm_head, torch.nn.Linear)  # nothing half done


@pytest.mark.parametrize("passes,said", [
    # the run stopped at vq_logits after the prune / quantize had run (and --dry-run listed both)
    (lambda P, V: [P.Prune(method="magnitude", targets=["lm_head"], ignore=[]), V], "earlier prune pass replaces"),
    (lambda P, V: [P.Quantize(method="rtn", targets=["lm_head"], ignore=[]), V], "earlier quantize pass replaces"),
    # prune refused the codebook head after the k-means; quantize left it out without a word
    (lambda P, V: [V, P.Prune(method="magnitude", targets=["lm_head"], ignore=[])], "prune targets lm_head"),
    (lambda P, V: [V, P.Quantize(method="rtn", targets=["re:.*"], ignore=[])], "quantize targets lm_head"),
])
def test_passes_around_the_codebook_head_are_refused_before_any_work(reference_model, passes, said):
    import compress.passes as P

    model = copy.deepcopy(reference_model)
    run = passes(P, VQLogits(num_codes=16, scale_bias=False, distill=False, weighting="uniform"))
    with pytest.raises(ConfigError, match=said):
        compress.apply(model, run, progress=False)
    assert isinstance(model.lm_head, torch.nn.Linear) and not model.lm_head.weight.eq(0).any()  # nothing ran


def test_plain_copy_needs_no_calibration_and_tied_heads_are_untied(tiny_model, arch, tmp_path):
    model = tiny_model(arch, tie_word_embeddings=True)
    emb = model.get_input_embeddings().weight.detach().clone()
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    p = VQLogits(num_codes=16, scale_bias=False, weighting="uniform", kmeans_iterations=5)
    assert not p.needs_calibration_for()
    _, report = compress.apply(model, [p], progress=False)
    details = report.passes[0].details
    assert details["untied"] and "untied" in details["note"] and details["codes_dtype"] == "uint8"
    assert details["note"] in report.passes[0].notes  # (what apply prints)
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.get_input_embeddings().weight, emb)          # the input embedding is kept
    # plain copy: tokens that share a code get identical logits
    h = torch.randn(2, 64)
    logits = model.lm_head(h)
    codes = model.lm_head.codes.long()
    same = (codes == codes[0]).nonzero().flatten()
    assert torch.allclose(logits[:, same], logits[:, same[:1]].expand(-1, same.numel()))
    ids = torch.randint(0, 128, (1, 5))
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)
    compress.save(model, tmp_path / arch)
    loaded = compress.load(tmp_path / arch)
    assert isinstance(loaded.lm_head, VQLogitsHead)
    assert torch.allclose(loaded.get_input_embeddings().weight, emb, atol=1e-3)  # as stored (fp32 or bf16)
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0.05)


def test_recipe_through_the_cli(tmp_path, reference_model, reference_tokenizer):
    from click.testing import CliRunner

    from compress.cli import main

    raw = yaml.safe_load(RECIPE.read_text())
    args = raw["passes"][0]["vq_logits"]
    assert args["scale_bias"] and args["distill"] and raw["calibration"]["source"] == "builtin:calibration"
    recipe = compress.Recipe.from_yaml(RECIPE)                            # the shipped recipe validates
    assert recipe.build_passes()[0].config.num_codes == args["num_codes"]
    # the same recipe, with less calibration data and a shorter distillation so that the test stays fast
    raw["calibration"].update(num_samples=8, seq_len=128)
    args.update(num_codes=256, distill_steps=10, kmeans_iterations=5)
    small = tmp_path / "vq.yaml"
    small.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["apply", str(small), "--output", str(out), "--eval-windows", "2", "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    loaded = compress.load(out)
    assert isinstance(loaded.lm_head, VQLogitsHead) and loaded.lm_head.num_codes == 256
    windows = heldout_windows(reference_tokenizer, seq_len=256, max_windows=2)
    mine = evaluate(loaded, windows, reference_model, progress=False)
    assert summary["eval"]["kl"] == pytest.approx(mine["kl"], rel=1e-5)
    assert 0 < mine["kl"] < 1.5  # K=256 from 1k calibration tokens: a sanity bound, quality is tested above


def test_benchmark_head_only_scoring_equals_full_evaluation(fitted, reference_model, heldout, script_module):
    """benchmarks/vq_logits.py scores heads on captured hidden states; that must equal compress.evaluate."""
    bench = script_module("benchmarks/vq_logits.py")
    model, _ = fitted["distill"]
    windows = heldout[:4]
    hidden = bench.head_inputs(reference_model, windows)
    mine = bench.quality(model.lm_head, hidden, windows, reference_model.lm_head.weight.detach())
    full = evaluate(model, windows, reference_model, progress=False)
    for key in ("perplexity", "kl", "top1_agreement"):
        assert mine[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6)


def test_budget_of_an_untied_head_counts_the_original_matrix_once(tiny_model, reference_tokenizer):
    """A tied head stored its matrix once (the embedding's); after vq_logits unties it the config says untied, and
    inspect's original total counted the matrix twice (a 1.02x growth reported as 0.57x)."""
    import torch

    import compress
    from compress.budget import budget
    from compress.inspection import stored_bytes

    model = tiny_model("llama", tie_word_embeddings=True, vocab_size=8192)
    original = stored_bytes(model, torch.bfloat16)
    model, _ = compress.apply(model, [compress.passes.VQLogits(num_codes=64, kmeans_iterations=2)],
                              calibration=compress.CalibrationSpec(source="builtin:calibration", num_samples=2,
                                                                   seq_len=32),
                              tokenizer=reference_tokenizer, progress=False)
    assert model.config.tie_word_embeddings is False
    total = budget(model, model.config.compression, torch.bfloat16)["weights_total"]
    assert total["original"] == original
    assert total["stored"] == stored_bytes(model, torch.bfloat16) > original  # it grew by the VQ head


def test_a_frozen_eval_model_gets_a_frozen_eval_head_without_gradients(reference_model, reference_tokenizer):
    """The distilled head came back trainable, in train mode and holding the distillation's gradients inside a
    frozen eval model (a user's next optimizer step would have applied them)."""
    model = copy.deepcopy(reference_model).requires_grad_(False).eval()
    compress.apply(model, [VQLogits(num_codes=64, distill=True, distill_steps=3)],
                   calibration={"num_samples": 4, "seq_len": 64}, tokenizer=reference_tokenizer, progress=False)
    assert not model.lm_head.training
    assert all(not p.requires_grad and p.grad is None for p in model.lm_head.parameters())


def test_a_distillation_cut_by_its_time_budget_says_so(reference_model, reference_tokenizer):
    """Its bar counted to distill_steps and the run stopped earlier with nothing said (174 of 300 steps)."""
    model = copy.deepcopy(reference_model)
    _, report = compress.apply(model, [VQLogits(num_codes=64, distill=True, distill_steps=50, distill_seconds=1e-9)],
                               calibration={"num_samples": 4, "seq_len": 64}, tokenizer=reference_tokenizer,
                               progress=False)
    done = report.passes[0].details["distill"]["steps"]
    assert done < 50 and any(f"after {done} of 50 steps" in n for n in report.passes[0].notes)

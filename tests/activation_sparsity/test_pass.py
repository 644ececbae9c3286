"""The activation_sparsity pass: thresholds meet the perplexity budget, the checkpoint reloads the thresholds, the
recipe runs, mistakes are clear errors (the decode paths themselves: test_decode_paths.py)."""
import copy
import shutil
from pathlib import Path

import pytest
import torch

import compress
from compress.activation_sparsity import ActivationSparseMLP, ActivationSparsity
from compress.calibration import CalibrationSpec, build_batches

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "activation-sparse.yaml"
FAST = dict(outer_steps=3, inner_steps=8, search_tokens=128)
CALIB = {"source": "builtin:calibration", "num_samples": 2, "seq_len": 64}


def mlps(model):
    return [m for m in model.modules() if isinstance(m, ActivationSparseMLP)]


def calibrated(tokenizer, dtype="float32", **config):
    """builtin:tiny through the pass (the FAST search, then `config`): (model, the pass's details)."""
    spec = ActivationSparsity(**{**FAST, **config})
    model, report = compress.apply(compress.load("builtin:tiny", dtype=dtype), [spec], calibration=CALIB,
                                   tokenizer=tokenizer, progress=False)
    return model, report.passes[0].details


def assert_reloaded_decodes_like(model, reloaded):
    """Same logits as the model it was saved from, and greedy decoding through the gathers gives the masked dense
    path's tokens."""
    ids = torch.randint(0, 8192, (1, 20), generator=torch.Generator().manual_seed(0))  # > 16: prefill-sized
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        fast = reloaded.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        for m in mlps(reloaded):
            m.max_sparse_tokens = 0
        slow = reloaded.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(fast, slow)


def test_pass_meets_budget_and_reloads(tmp_path, reference_tokenizer):
    model, d = calibrated(reference_tokenizer, dtype="auto", target_ppl_increase=0.02)
    assert len(mlps(model)) == 6 and len(d["thresholds"]) == 6
    assert 0 < d["ppl_increase"] <= 0.02 and d["sparsity"] > 0.2
    assert [float(m.threshold) for m in mlps(model)] == pytest.approx(d["thresholds"])
    reloaded = compress.load(compress.save(model, tmp_path / "as"))
    assert [float(m.threshold) for m in mlps(reloaded)] == pytest.approx(d["thresholds"], rel=1e-6)
    assert mlps(reloaded)[0].runtime_path(1).startswith("active rows only")
    assert_reloaded_decodes_like(model, reloaded)
    # quantized afterwards, up/down have no rows to gather: decoding and inspect both say masked dense
    from compress.prune.runtime import runtime_plan

    compress.apply(model, [compress.get_pass("quantize")(method="rtn")], progress=False)
    plan = runtime_plan(compress.load(compress.save(model, tmp_path / "as_rtn"), meta=True))
    assert mlps(model)[0].runtime_path(1) == "masked dense"
    assert "masked dense" in plan["model.layers.0.mlp"]


def test_pass_with_predictor_meets_recall_and_reloads(tmp_path, reference_tokenizer):
    model, d = calibrated(reference_tokenizer, target_ppl_increase=0.02, predictor_rank=32, predictor_recall=0.95)
    assert len(d["candidate_share"]) == 6 and all(0 < c < 1 for c in d["candidate_share"])
    assert d["predictor_thresholds"] == pytest.approx([float(m.predictor_threshold) for m in mlps(model)])
    m0 = mlps(model)[0]
    seen = []
    handle = m0.gate_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(-1, 256)))
    text = reference_tokenizer("The tutorial explains how to define a function in Python.", return_tensors="pt")
    with torch.no_grad():
        model(input_ids=text.input_ids)
        handle.remove()
        x = torch.cat(seen)
        exact = m0.scores(m0.act_fn(m0.gate_proj(x))) >= m0.threshold  # on real inputs the predictor finds most
        assert 0 < float(m0.predictor_threshold) and float((exact & m0.candidates(x)).sum() / exact.sum()) > 0.8
    reloaded = compress.load(compress.save(model, tmp_path / "asp"), dtype="float32")
    r0 = mlps(reloaded)[0]
    assert r0.predictor_rank == 32 and float(r0.predictor_threshold) == pytest.approx(float(m0.predictor_threshold))
    assert "rank-32 predicted candidates" in r0.runtime_path(1)
    assert torch.equal(r0.predictor_in, m0.predictor_in)  # rounded to the checkpoint's bf16 when fitted
    assert_reloaded_decodes_like(model, reloaded)


def test_greedy_per_layer_thresholds_meet_budget(reference_tokenizer):
    """greedy_rounds: per-layer thresholds built up from zero, each move kept only within the budget."""
    model, d = calibrated(reference_tokenizer, target_ppl_increase=0.02, greedy_rounds=3, greedy_step=0.1)
    assert d["cett"] == 0.0 and d["ppl_increase"] <= 0.02  # no CETT bisection; within the budget
    assert sum(s > 0.05 for s in d["layer_sparsity"]) <= 3  # three moves, one layer each
    assert 0.1 * 0.8 < max(d["layer_sparsity"]) and [float(m.threshold) for m in mlps(model)] == \
        pytest.approx(d["thresholds"])


def test_recipe_runs(reference_tokenizer):
    recipe = compress.Recipe.from_yaml(RECIPE)
    assert recipe.passes[0].name == "activation_sparsity"
    recipe.calibration = CalibrationSpec(**CALIB)
    recipe.passes[0].args.update(FAST)
    model, report = compress.apply(compress.load(recipe.model), recipe, tokenizer=reference_tokenizer, progress=False)
    assert report.passes[0].details["ppl_increase"] <= 0.01 and len(mlps(model)) == 6


def test_user_errors(reference_tokenizer):
    with pytest.raises(compress.ConfigError, match="match no gated MLP"):
        compress.apply(compress.load("builtin:tiny"), [ActivationSparsity(targets=[r"re:.*\.q_proj"])],
                       calibration=CALIB, tokenizer=reference_tokenizer, progress=False)
    with pytest.raises(compress.CalibrationError):
        compress.apply(compress.load("builtin:tiny"), [ActivationSparsity()], progress=False)
    with pytest.raises(compress.ConfigError, match="target_ppl_increase"):
        ActivationSparsity(target_ppl_increase=1.5)


def test_neuron_scaling_criterion_paths_and_reload(tmp_path, reference_tokenizer):
    """neuron_scaling: the kept neurons are those with |act(gate)| * s_i >= threshold, s_i = E|up_i| * ||W_down[:, i]||
    (mean 1) on the calibration tokens; the sparse path with a predictor equals the masked dense path; the scales
    reload with the checkpoint."""
    model, _ = calibrated(reference_tokenizer, target_ppl_increase=0.02, neuron_scaling=True, predictor_rank=32)
    m0 = mlps(model)[0]
    assert not m0.training and "active rows only" in m0.runtime_path(3)  # the model is in eval mode: decode path
    scale = m0.neuron_scale
    assert scale.mean().item() == pytest.approx(1.0, rel=0.01) and scale.std() > 0.05  # not all ones
    x = torch.randn(3, 256) * 3
    with torch.no_grad():
        g = m0.act_fn(m0.gate_proj(x))
        keep = (g.abs() * scale >= m0.threshold) & m0.candidates(x)
        expected = m0.down_proj(g * m0.up_proj(x) * keep)
        fast = m0(x)
        m0.max_sparse_tokens = 0
        masked = m0(x)
        m0.max_sparse_tokens = 4
    assert 0 < keep.float().mean() < 1
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-5)
    reloaded = compress.load(compress.save(model, tmp_path / "scaled"), dtype="float32")
    r0 = mlps(reloaded)[0]
    assert r0.neuron_scaling and torch.equal(r0.neuron_scale, scale)  # rounded to the checkpoint's bf16 when fitted
    assert_reloaded_decodes_like(model, reloaded)


def test_pass_with_quantized_predictor_reloads(tmp_path, reference_tokenizer):
    model, d = calibrated(reference_tokenizer, target_ppl_increase=0.02, predictor_bits=8, predictor_recall=0.995)
    active = [1 - s for s in d["layer_sparsity"]]
    # a close prediction: the candidates are barely more than the active neurons (a rank-32 SVD needs far more)
    assert all(a - 0.01 <= c <= a + 0.1 for a, c in zip(active, d["candidate_share"])), (active, d["candidate_share"])
    assert d["ppl_increase"] <= 0.02
    m0 = mlps(model)[0]
    reloaded = compress.load(compress.save(model, tmp_path / "asq"), dtype="float32")
    r0 = mlps(reloaded)[0]
    assert r0.predictor_bits == 8 and r0.predictor_codes.dtype == torch.int8
    assert torch.equal(r0.predictor_codes, m0.predictor_codes) and torch.equal(r0.predictor_scales, m0.predictor_scales)
    assert "int8 predicted candidates" in r0.runtime_path(1)
    from compress.prune.runtime import runtime_plan
    assert "int8 predicted candidates" in runtime_plan(reloaded)["model.layers.0.mlp"]  # what `compress inspect` says
    assert_reloaded_decodes_like(model, reloaded)


def test_predictor_misses_stay_within_the_budget(reference_tokenizer):
    """A poor predictor (rank 2, recall 0.6) would push perplexity past the budget: its thresholds are scaled down
    until the calibration perplexity, misses included, is within it again."""
    model, d = calibrated(reference_tokenizer, target_ppl_increase=0.02, predictor_rank=2, predictor_recall=0.6)
    assert 0 <= d["predictor_threshold_scale"] < 1 and d["ppl_increase"] <= 0.02
    assert d["predictor_thresholds"] == pytest.approx([float(m.predictor_threshold) for m in mlps(model)])


def test_sparsegpt_after_activation_sparsity(reference_tokenizer):
    """The activation-sparse MLP holds down_proj column-major; SparseGPT after it (unstructured: its blocks are
    flattened) prunes it like any other layer (it raised "view size is not compatible" before)."""
    model, _ = calibrated(reference_tokenizer)
    down = mlps(model)[0].down_proj.weight
    assert down.stride(0) == 1  # column-major (the suite's fixture lets the tiny MLPs gather)
    compress.apply(model, [compress.passes.Prune(method="sparsegpt", sparsity=0.5, storage="dense")],
                   calibration=CALIB, tokenizer=reference_tokenizer, progress=False)
    w = mlps(model)[0].down_proj.weight
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.01


def test_after_a_prune_stored_dense(tmp_path, reference_tokenizer):
    """`prune {storage: dense}` leaves plain Linears holding zeros, which the MLP gathers like any dense weight (it
    was refused as "replaces gate_proj"); the zeros and the thresholds survive a reload. A packing prune stays
    refused, with the way out named."""
    prune = compress.passes.Prune(sparsity=0.5, storage="dense")
    spec = ActivationSparsity(**FAST)
    model, report = compress.apply(compress.load("builtin:tiny"), [prune, spec], calibration=CALIB,
                                   tokenizer=reference_tokenizer, progress=False)
    assert len(mlps(model)) == 6 and report.passes[1].details["sparsity"] > 0
    up = mlps(model)[0].up_proj.weight
    assert abs(float((up == 0).float().mean()) - 0.5) < 0.01
    reloaded = compress.load(compress.save(model, tmp_path / "ps"))
    assert torch.equal(mlps(reloaded)[0].up_proj.weight, up)
    assert_reloaded_decodes_like(model, reloaded)
    with pytest.raises(compress.ConfigError, match="or give prune `storage: dense`"):
        compress.apply(compress.load("builtin:tiny"), [compress.passes.Prune(sparsity=0.5), ActivationSparsity(**FAST)],
                       calibration=CALIB, tokenizer=reference_tokenizer, progress=False)


def test_pass_with_quantized_gate_budgets_against_the_original_and_reloads(tmp_path, reference_tokenizer):
    """The budget counts the quantized gate's own cost: the calibration perplexity is measured against the original
    model (the gate computed exactly), and the checkpoint reloads the gate as its copy."""
    model, d = calibrated(reference_tokenizer, target_ppl_increase=0.02, predictor_bits=8, exact_gate=False)
    original = compress.load("builtin:tiny", dtype="float32")
    from compress.evaluate import evaluate
    windows = build_batches(CalibrationSpec(**CALIB), reference_tokenizer)
    assert d["perplexity_dense"] == pytest.approx(evaluate(original, windows, progress=False)["perplexity"])
    assert 0 < d["quantized_gate_ppl_increase"] <= d["ppl_increase"] <= 0.02
    assert d["sparsity"] > 0.1
    reloaded = compress.load(compress.save(model, tmp_path / "asg"), dtype="float32")
    r0 = mlps(reloaded)[0]
    assert not r0.exact_gate and "the gate from its int8 copy" in r0.runtime_path(1)
    assert_reloaded_decodes_like(model, reloaded)  # (the model in memory was rounded to the checkpoint's dtype)
    ids = torch.randint(0, 8192, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # inference tensors keep no version counter: the expansion is keyed without it
        loaded = compress.load(tmp_path / "asg", dtype="float32")
        torch.testing.assert_close(loaded(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    # the checkpoint stores the gate's codes, not their expansion (rebuilt on load): its bytes are counted so
    from safetensors.torch import load_file, save_file
    from compress.inspection import stored_bytes
    stored = load_file(tmp_path / "asg" / "model.safetensors")
    assert "model.layers.0.mlp.predictor_codes" in stored
    assert not [k for k in stored if k.endswith("gate_proj.weight")]
    dtype = stored["model.embed_tokens.weight"].dtype
    assert stored_bytes(model, dtype) == sum(t.numel() * t.element_size() for t in stored.values())
    # a checkpoint written before (the expanded gate stored too) loads the same; so does one left on disk
    old = tmp_path / "asg_old"
    shutil.copytree(tmp_path / "asg", old)
    save_file({**stored, **{f"model.layers.{i}.mlp.gate_proj.weight": m.gate_proj.weight.to(dtype)
                            for i, m in enumerate(mlps(model))}}, old / "model.safetensors")
    offloaded = compress.load(tmp_path / "asg", dtype="float32", max_memory="1MB")
    assert offloaded.compress_offloaded_layers
    # a later pass visits each layer on disk: the gate it left out is rebuilt there too
    pruned, _ = compress.apply(compress.load(tmp_path / "asg", dtype="float32", max_memory="1MB"),
                               [compress.passes.Prune(method="magnitude", sparsity=0.5, storage="dense",
                                                      ignore=["re:.*lm_head", "re:.*embed_tokens", "re:.*gate_proj"])],
                               calibration=CALIB, tokenizer=reference_tokenizer, progress=False)
    assert pruned.compress_offloaded_layers
    new = compress.load(tmp_path / "asg", dtype="float32")  # (`reloaded` decodes masked dense by now)
    with torch.no_grad():
        for other in (compress.load(old, dtype="float32"), offloaded):
            for n in (20, 1):  # prefill, and one decoding token (a layer on disk expands its gate into a buffer)
                tol = 1e-5 if other is offloaded else 0.0
                torch.testing.assert_close(other(input_ids=ids[:, :n]).logits, new(input_ids=ids[:, :n]).logits,
                                           rtol=tol, atol=tol)
    with pytest.raises(compress.ConfigError, match="predictor_bits"):
        ActivationSparsity(exact_gate=False)
    with pytest.raises(compress.ConfigError, match="already computes its gate from a quantized copy"):
        compress.apply(model, [ActivationSparsity(**FAST)], calibration=CALIB, tokenizer=reference_tokenizer,
                       progress=False)  # its original gate is gone: no second calibration on top
    fresh = compress.load("builtin:tiny", dtype="float32")
    gate = fresh.model.layers[0].mlp.gate_proj.weight.clone()
    with pytest.raises(compress.CalibrationError, match="the int4 gate alone"):  # a budget its rounding exceeds
        compress.apply(fresh, [ActivationSparsity(**FAST, target_ppl_increase=1e-5, predictor_bits=4,
                                                  exact_gate=False)],
                       calibration=CALIB, tokenizer=reference_tokenizer, progress=False)
    assert torch.equal(mlps(fresh)[0].gate_proj.weight, gate)  # the original gate is left as it was
    # a pass that would quantize the gate nothing calls any more is refused before any work, unless it ignores it
    from compress.quantize.pass_ import Quantize
    sparse = ActivationSparsity(predictor_bits=8, exact_gate=False)
    with pytest.raises(compress.ConfigError, match=r"quantize targets model\.layers\.0\.mlp\.gate_proj.*ignore"):
        Quantize(method="rtn").checked(compress.load("builtin:tiny"), [sparse])
    Quantize(method="rtn", ignore=["re:.*gate_proj", "lm_head"]).checked(compress.load("builtin:tiny"), [sparse])
    # the same for a checkpoint that already holds such MLPs (its modules say what they no longer call), and the
    # pass itself is refused at the checks (a dry run says so), not only when it runs
    with pytest.raises(compress.ConfigError, match=r"gate_proj is never called: set quantize's ignore to "
                                                   r"\['re:\.\*lm_head', 're:\.\*embed_tokens', 're:\.\*gate_proj'\]"):
        Quantize(method="rtn").checked(reloaded)
    with pytest.raises(compress.ConfigError, match="already computes its gate"):
        ActivationSparsity().checked(reloaded)
    with pytest.raises(compress.ConfigError, match="twice over the same MLPs"):  # a second one in the same recipe
        ActivationSparsity().checked(compress.load("builtin:tiny"), [sparse])
    from compress.recover.pass_ import Recover  # training the gate in full (or its MLP) is refused as well
    for names in (["re:.*layers\\.0\\.mlp\\.gate_proj"], ["re:.*layers\\.0\\.mlp$"]):
        with pytest.raises(compress.ConfigError, match="gate_proj is never called"):
            Recover(train_modules=names).checked(compress.load("builtin:tiny"), [sparse])


def test_a_later_pass_over_the_mlps_is_noted_in_the_budget_report(reference_tokenizer):
    """The budget is met on the MLPs as they were: a prune of them later in the same run says so in the report (and
    `compress apply` prints it); a prune of the attention layers does not touch what was measured."""
    notes = {}
    for targets in (["re:.*mlp\\..*_proj"], ["re:.*self_attn\\..*_proj"]):
        _, report = compress.apply(compress.load("builtin:tiny"),
                                   [ActivationSparsity(**FAST), compress.passes.Prune(sparsity=0.5, targets=targets)],
                                   calibration=CALIB, tokenizer=reference_tokenizer, progress=False)
        # (FAST's few search steps find no threshold on this model: that note is another test's subject)
        notes[targets[0]] = [n for n in report.passes[0].notes if "found no threshold" not in n]
        assert report.passes[1].notes == []
        assert report.to_dict()["passes"][0]["notes"] == report.passes[0].notes
    assert notes["re:.*mlp\\..*_proj"] == ["its perplexity budget (+1%) was met before prune changed these MLPs; the "
                                           "evaluation after the recipe shows the combined cost"]
    assert notes["re:.*self_attn\\..*_proj"] == []


def test_a_search_that_finds_no_threshold_says_so():
    """With too few search steps every CETT tried costs more than the budget: the pass ends with nothing skipped,
    and says so in its report (it ended silently at 0% with a `cett` that was not in effect)."""
    cal = {"source": "builtin:calibration", "num_samples": 4, "seq_len": 64}
    _, report = compress.apply(compress.load("builtin:tiny"),
                               [compress.passes.ActivationSparsity(outer_steps=1, inner_steps=1)], calibration=cal,
                               progress=False)
    entry = report.passes[0]
    assert entry.details["sparsity"] == 0.0 and any("found no threshold within its budget" in n for n in entry.notes)
    # 4 x 64 calibration tokens under the default search_tokens 2048: said too (it was silent, an audit's find)
    assert any("search_tokens 2048 is more than the calibration's 256 tokens; the thresholds were set on 256" in n
               for n in entry.notes), entry.notes


def test_a_predictor_rank_past_the_gate_is_refused_before_work(tiny_model):
    """predictor_rank 300 on a 64-wide gate ran the whole threshold search, then failed in the SVD fit (a helper's
    audit); refused before any work now, by the checks apply and --dry-run run."""
    model = tiny_model("llama")  # hidden 64, MLP 128
    with pytest.raises(compress.ConfigError, match=r"predictor_rank 300 is larger than .*gate_proj's smaller side "
                                                   r"\(64\)"):
        ActivationSparsity(predictor_rank=300).check(model)
    ActivationSparsity(predictor_rank=64).check(model)  # the largest that fits


def test_a_model_without_a_finite_perplexity_is_refused_not_sparsified(reference_tokenizer):
    # NaN < limit is False and inf * 1.01 is inf: a budget set from such a perplexity accepted every threshold
    model = compress.load("builtin:tiny")
    with torch.no_grad():  # finite weights (NaN ones are refused before any pass), a mean NLL past e**709
        model.lm_head.weight.mul_(1e4)
    with pytest.raises(compress.CalibrationError, match="perplexity on the calibration text is inf.*--dtype float32"):
        compress.apply(model, [ActivationSparsity(**FAST)], calibration=CALIB, tokenizer=reference_tokenizer,
                       progress=False)


def test_thresholds_set_in_memory_are_saved_and_survive_a_dtype_cast(tmp_path, reference_tokenizer):
    """A save wrote the pass's thresholds whatever the modules held (logits 1.2 apart after a reload), and
    `.to(bfloat16)` rounded them (other neurons kept than in the same model loaded in bf16)."""
    model, _ = calibrated(reference_tokenizer, target_ppl_increase=0.05)
    first = mlps(model)[0]
    exact = float(mlps(model)[1].threshold)
    assert float(first.threshold) > 0 and exact > 0
    first.threshold.fill_(0.0)  # this layer dense again
    reloaded = compress.load(compress.save(model, tmp_path / "edited"), dtype="float32")
    assert float(mlps(reloaded)[0].threshold) == 0.0 and float(mlps(reloaded)[1].threshold) == exact
    assert_reloaded_decodes_like(model, reloaded)
    model.to(torch.bfloat16)
    assert mlps(model)[1].threshold.dtype == torch.float32 and float(mlps(model)[1].threshold) == exact
    model.float()
    assert float(mlps(compress.load(compress.save(model, tmp_path / "cast")))[1].threshold) == exact
    empty = copy.deepcopy(model).to("meta").to_empty(device="cpu")  # (no value to keep: no copy out of meta)
    assert mlps(empty)[1].threshold.dtype == torch.float32


def test_decoding_settings_changed_in_memory_are_saved(tmp_path, reference_tokenizer):
    """max_sparse_tokens set on every MLP, and a gear_kv cache's settings replaced, came back as the pass's
    arguments after a save and reload."""
    from compress.kvcache.config import KVCacheSettings

    model, _ = calibrated(reference_tokenizer)
    for m in mlps(model):
        m.max_sparse_tokens = 9
    compress.apply(model, [compress.get_pass("gear_kv")(method="kivi", bits=4)], progress=False)
    model.kv_cache_settings = KVCacheSettings(method="kivi", bits=2)
    reloaded = compress.load(compress.save(model, tmp_path / "edited"))
    assert {m.max_sparse_tokens for m in mlps(reloaded)} == {9}
    assert reloaded.kv_cache_settings.bits == 2 and reloaded.kv_cache_settings == model.kv_cache_settings

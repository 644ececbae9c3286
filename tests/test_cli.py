"""The command line end to end: magnitude pruning of the reference model through `compress apply`, reload,
evaluation; exit codes and messages for user mistakes."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import compress
from compress.cli import main
from compress.evaluate import evaluate, heldout_windows

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def magnitude_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "mag50"
    result = run("apply", RECIPES / "magnitude-50.yaml", "--output", out, "--eval-windows", 8, "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_apply_exports_a_sparse_checkpoint_that_reloads(magnitude_checkpoint, reference_model):
    out, summary = magnitude_checkpoint
    assert (out / "recipe.yaml").exists() and (out / "report.json").exists()
    config = json.loads((out / "config.json").read_text())
    (entry,) = config["compression"]["passes"]
    assert entry["pass"] == "prune" and entry["args"]["sparsity"] == 0.5
    assert summary["passes"][0]["num_modules"] == 42
    reloaded = compress.load(out)
    # every pruned Linear's effective weight is exactly half zeros; the head and embeddings are untouched
    x = torch.eye(256)
    for i in range(6):
        layer = reloaded.model.layers[i]
        for proj in (layer.self_attn.q_proj, layer.mlp.up_proj):
            w = proj(x).T  # weight as the module applies it, whatever its storage
            assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6)
    assert torch.equal(reloaded.lm_head.weight, reference_model.lm_head.weight)


def test_apply_eval_numbers_match_an_independent_evaluation(magnitude_checkpoint, reference_model, reference_tokenizer):
    out, summary = magnitude_checkpoint
    ev = summary["eval"]
    windows = heldout_windows(reference_tokenizer, seq_len=256, max_windows=8)
    mine = evaluate(compress.load(out), windows, reference_model, progress=False)
    assert ev["perplexity"] == pytest.approx(mine["perplexity"], rel=1e-6)
    assert ev["kl"] == pytest.approx(mine["kl"], rel=1e-6)
    assert ev["top1_agreement"] == pytest.approx(mine["top1_agreement"])
    # magnitude pruning at 50% hurts the trained model: worse perplexity, KL > 0, not all argmaxes agree
    assert ev["perplexity"] > ev["baseline_perplexity"]
    assert ev["kl"] > 1e-3 and ev["top1_agreement"] < 0.99


def test_eval_json_interface(magnitude_checkpoint):
    out, _ = magnitude_checkpoint
    result = run("eval", out, "--baseline", "builtin:tiny", "--max-windows", 4, "--no-speed", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("perplexity", "kl", "top1_agreement", "parameters", "bytes"):
        assert key in data
    dense = compress.load("builtin:tiny")
    pruned_away = sum(m.weight.numel() // 2 for m in dense.model.layers.modules() if isinstance(m, torch.nn.Linear))
    # stored numbers: the packed layers keep half their weights (no zeros stored)
    assert data["parameters"] == sum(p.numel() for p in dense.parameters()) - pruned_away


def test_inspect_generate_and_passes(magnitude_checkpoint):
    out, _ = magnitude_checkpoint
    result = run("inspect", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["compression"]["passes"][0]["pass"] == "prune"
    assert set(data["components"]) >= {"embeddings", "attention", "mlp", "head"}
    assert data["components"]["head"]["dense"] == 8192 * 256 * 2  # bf16 storage
    gen = run("generate", out, "--prompt", "The list type", "--max-new-tokens", 8)
    assert gen.exit_code == 0 and gen.output.startswith("The list type")
    listing = json.loads(run("passes", "--json").stdout)
    assert listing["prune"]["arguments"]["sparsity"]["default"] == 0.5


def test_passes_listing_wraps_with_a_hanging_indent():
    """Piped (120 columns): a long description continues indented under its argument, never at column 0 where the
    next pass's name stands, and every argument of every pass is listed."""
    from compress.registry import available_passes

    lines = run("passes").stdout.splitlines()
    assert max(map(len, lines)) <= 120
    heads = [line.split(":")[0] for line in lines if not line.startswith(" ")]
    assert heads == list(available_passes())
    arguments = [line.split(":")[0].strip() for line in lines if line.startswith("    ") and line[4] != " "]
    assert len(arguments) == sum(len(cls.Config.model_fields) for cls in available_passes().values())


def test_the_stored_recipe_says_what_the_command_line_overrode(tmp_path, magnitude_checkpoint):
    """It read `model: builtin:tiny` over a run on another model: running it again compressed that one."""
    out, _ = magnitude_checkpoint
    assert (out / "recipe.yaml").read_text() == "# compress apply ran this recipe with --output " + str(out) + \
        " (the recipe's output: out/magnitude-50)\n" + (RECIPES / "magnitude-50.yaml").read_text()
    result = run("apply", RECIPES / "w4-rtn.yaml", "--model", out, "-o", tmp_path / "again", "--no-eval")
    assert result.exit_code == 0, result.output
    stored = (tmp_path / "again" / "recipe.yaml").read_text()
    assert stored.startswith(f"# compress apply ran this recipe with --model {out} (the recipe's model: builtin:tiny)")
    compress.Recipe.from_text(stored)  # still a recipe
    from compress.cli import _recipe_as_run  # no option given: the recipe as written (a relative model: resolved
    recipe = compress.Recipe.from_yaml(RECIPES / "magnitude-50.yaml")  # against its folder is not an override)
    assert _recipe_as_run(recipe, {"model": None, "output": None}) == recipe.text
    assert "original model: builtin:tiny" in run("inspect", tmp_path / "again").output  # the first pass's source


def test_validate_checks_the_local_model_and_output_paths(tmp_path):
    """`validate` said ok to a model folder that is not there and an output that is a file (apply then failed)."""
    (tmp_path / "afile").write_text("x")
    for line, said in (("model: /nonexistent/model\noutput: out/x", "model: model /nonexistent/model does not exist"),
                       (f"model: builtin:tiny\noutput: {tmp_path / 'afile'}", "is a file; give a folder path")):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"{line}\npasses:\n  - prune: {{method: magnitude}}\n")
        result = run("validate", recipe)
        assert result.exit_code == 2 and said in result.output, result.output


def test_a_calibration_section_no_pass_reads_is_said(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: builtin:tiny\ncalibration: {source: builtin:calibration}\n"
                      "passes:\n  - prune: {method: magnitude}\n")
    result = run("apply", recipe, "--output", tmp_path / "o", "--dry-run")
    assert result.exit_code == 0 and "its `calibration:` section is not used" in result.stderr


def test_dry_run_lists_modules_without_writing(tmp_path):
    result = run("apply", RECIPES / "magnitude-50.yaml", "--dry-run", "--output", tmp_path / "never")
    assert result.exit_code == 0, result.output
    assert "model.layers.5.mlp.down_proj" in result.output and "lm_head" not in result.output
    assert not (tmp_path / "never").exists()


def test_user_mistakes_exit_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: builtin:tiny\npasses:\n  - prune: {sparsity: 2}\n")
    for args in (["validate", bad], ["apply", bad, "--output", tmp_path / "o"]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 2
        assert f"{bad}:3:" in result.output and "Traceback" not in result.output
    good = tmp_path / "good.yaml"
    good.write_text("model: builtin:nope\npasses:\n  - prune: {}\n")
    result = CliRunner().invoke(main, ["apply", str(good), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown built-in model" in result.output
    (tmp_path / "exists").mkdir()
    result = CliRunner().invoke(main, ["apply", str(RECIPES / "magnitude-50.yaml"), "--output", str(tmp_path / "exists")])
    assert result.exit_code == 2 and "already exists" in result.output
    # "" fell back to the recipe's output silently; an unknown ~user was pathlib's RuntimeError (a traceback)
    for args, said in ((["--output", ""], "--output is empty"), (["--model", " "], "--model is empty"),
                       (["--output", "~no-such-user-here/o"], "cannot expand '~no-such-user-here'"),
                       (["--model", "~no-such-user-here/m"], "cannot expand '~no-such-user-here'")):
        result = CliRunner().invoke(main, ["apply", str(RECIPES / "magnitude-50.yaml"), "--dry-run", *args])
        assert result.exit_code == 2 and said in result.output and "Traceback" not in result.output, result.output


@pytest.mark.skipif(shutil.which("compress") is None, reason="console script not installed")
def test_console_script_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: builtin:tiny\npasses:\n  - prun: {}\n")
    proc = subprocess.run(["compress", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}:3:5: unknown pass 'prun' (did you mean 'prune'?); "
                                                f"known: {', '.join(compress.available_passes())}"]


def test_eval_activation_sparsity_stays_within_one_percent():
    result = run("eval", "builtin:tiny", "--max-windows", 4, "--no-speed", "--activation-sparsity", "--json")
    assert result.exit_code == 0, result.output
    a = json.loads(result.stdout)["activation_sparsity"]
    assert len(a["layer_sparsity"]) == 6
    assert 0 < a["sparsity"] < 1 and a["ppl_increase"] <= 0.01 + 1e-9


def test_eval_activation_sparsity_on_an_activation_sparse_model_says_so(tmp_path):
    """Its skipped neurons count as inactive and the +1% is over the sparse model: the figures read as the
    original's (a helper's run: 0.684 here vs 0.578 on builtin:tiny)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {source: builtin:calibration, num_samples: 4, seq_len: 64}\npasses:\n"
                      "  - activation_sparsity: {target_ppl_increase: 0.01, outer_steps: 2, inner_steps: 4, "
                      "search_tokens: 256}\n")
    assert run("apply", recipe, "--model", "builtin:tiny", "--output", tmp_path / "as", "--no-eval").exit_code == 0
    result = run("eval", tmp_path / "as", "--max-windows", 2, "--no-speed", "--activation-sparsity")
    assert result.exit_code == 0 and "note: this model is already activation-sparse" in result.output
    plain = run("eval", "builtin:tiny", "--max-windows", 2, "--no-speed", "--activation-sparsity")
    assert "already activation-sparse" not in plain.output


def test_eval_activation_sparsity_reads_quantized_down_projections(tmp_path):
    """An int4 checkpoint's eval --activation-sparsity ended, after the whole evaluation, in an AttributeError
    traceback (QuantizedLinear has no `weight`; an audit's find): it reads the dequantized weight."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - quantize: {method: rtn, bits: 4, group_size: 64}\n")
    assert run("apply", recipe, "--model", "builtin:tiny", "--output", tmp_path / "w4", "--no-eval").exit_code == 0
    result = run("eval", tmp_path / "w4", "--max-windows", 2, "--no-speed", "--activation-sparsity", "--json")
    assert result.exit_code == 0, result.output
    assert 0 < json.loads(result.stdout)["activation_sparsity"]["sparsity"] < 1


def test_apply_kv_cache_recipe_reports_the_chunked_cache_protocol(tmp_path):
    """The headline scores the model as served: through its compressed cache, as decoding reads it. A plain
    forward skipped the cache and reported KL 0 and agreement 1 for the weights the pass leaves unchanged."""
    from compress.kvcache.cache import GEARCache
    from compress.kvcache.quality import chunked_logits

    result = run("apply", RECIPES / "gear-kv4.yaml", "--output", tmp_path / "g", "--eval-windows", 2, "--json",
                 "--dtype", "float32")
    assert result.exit_code == 0, result.output
    ev = json.loads(result.stdout)["eval"]
    assert ev["kl"] > 1e-4 and ev["top1_agreement"] < 1 and "compressed KV cache" in ev["protocol"]
    assert ev["baseline"] == "builtin:tiny"
    # the reference: the same windows fed through a GEARCache chunk by chunk, as generate feeds it
    model = compress.load(tmp_path / "g", dtype="float32")
    windows = heldout_windows(compress.load_tokenizer(tmp_path / "g"), seq_len=256, max_windows=2)
    settings = model.kv_cache_settings
    with torch.no_grad():
        logits = chunked_logits(model, windows, lambda: GEARCache(model.config, settings), settings.residual_length)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), windows[:, 1:].flatten())
    assert ev["perplexity"] == pytest.approx(nll.exp().item(), rel=1e-4)
    # the cache's own cost against the same weights with an uncompressed cache: small but real
    kv = ev["kv_cache"]
    assert 0 < kv["kl"] < 0.05 and abs(kv["ppl_delta_pct"]) < 5 and kv["tokens_scored"] == 2 * (512 - 64 - 1)


def test_inspect_components_add_up_to_the_stored_tensors(magnitude_checkpoint):
    from safetensors import safe_open

    out, _ = magnitude_checkpoint
    data = json.loads(run("inspect", out, "--json").stdout)
    counted = sum(v["dense"] + v["compressed"] for v in data["components"].values())
    with safe_open(out / "model.safetensors", framework="pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert counted == stored
    assert data["components"]["mlp"]["compressed"] > 0 and data["components"]["mlp"]["dense"] == 0


def test_a_baseline_other_than_the_recorded_source_is_said(magnitude_checkpoint):
    """--baseline builtin:small beside a checkpoint made from builtin:tiny was scored without a word (KL 0.89)."""
    out, _ = magnitude_checkpoint
    other = run("eval", out, "--baseline", "builtin:small", "--max-windows", 1, "--no-speed", "--json")
    assert other.exit_code == 0 and "records it was made from builtin:tiny, not the baseline" in other.stderr
    assert json.loads(other.stdout)["source_model"] == "builtin:tiny"
    same = run("eval", out, "--baseline", "builtin:tiny", "--max-windows", 1, "--no-speed", "--json")
    assert "records it was made from" not in same.stderr and "source_model" not in json.loads(same.stdout)


def test_eval_defaults_to_the_recorded_source_model(magnitude_checkpoint):
    out, _ = magnitude_checkpoint
    data = json.loads(run("eval", out, "--max-windows", 2, "--no-speed", "--json").stdout)
    assert data["baseline"] == "builtin:tiny" and data["kl"] > 0


def test_dry_run_lists_every_pass_even_with_the_same_name(tmp_path):
    recipe = tmp_path / "two.yaml"
    recipe.write_text("model: builtin:tiny\npasses:\n  - prune: {targets: ['re:.*mlp.*']}\n"
                      "  - prune: {targets: ['re:.*self_attn.*'], structure: '2:4'}\n")
    result = run("apply", recipe, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plans = json.loads(result.stdout)["passes"]
    assert [len(p["modules"]) for p in plans] == [18, 24]  # the Linear layers inside the matched containers
    assert all(m.endswith("_proj") for p in plans for m in p["modules"])


@pytest.mark.parametrize("passes,skipped", [
    ("  - linearize: {layers: every_2}\n  - gear_kv: {}\n", "linearized: a recurrent state"),
    ("  - quantize: {method: rtn, targets: ['re:.*mlp.*']}\n  - quantize: {method: rtn, bits: 8}\n",
     "already quantized"),
    ("  - prune: {structure: '2:4', targets: ['re:.*mlp.*']}\n  - prune: {sparsity: 0.5}\n", "already pruned"),
])
def test_dry_run_lists_what_each_pass_touches_after_the_passes_before_it(passes, skipped, tmp_path):
    """The dry run checks on the original model; it listed a later pass's modules against it too (linearize every_2
    then gear_kv: 6 layers listed, 3 compressed). It lists what the run then reports, and the rest as skipped."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: builtin:tiny\npasses:\n" + passes)
    dry = run("apply", recipe, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    plans = json.loads(dry.stdout)["passes"]
    result = run("apply", recipe, "--output", tmp_path / "o", "--no-eval", "--json")
    assert result.exit_code == 0, result.output
    ran = json.loads(result.stdout)["passes"]
    assert [p["modules"] for p in plans] == [p["modules"] for p in ran]
    assert plans[1]["skipped"] == ran[1]["skipped"]
    assert all(why.startswith(skipped) for why in plans[1]["skipped"].values())


def test_relative_calibration_source_resolves_from_the_recipe_folder(tmp_path, reference_tokenizer):
    from compress.calibration import builtin_text

    (tmp_path / "calib.txt").write_text(builtin_text("builtin:calibration")[:20000])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: builtin:tiny\ncalibration: {source: calib.txt, num_samples: 4, seq_len: 64}\n"
                      "passes:\n  - prune: {method: wanda, sparsity: 0.3}\n")
    result = run("apply", recipe, "--output", tmp_path / "o", "--no-eval", "--json")
    assert result.exit_code == 0, result.output


def test_nm_structures_other_than_half_reload(tmp_path):
    model = compress.load("builtin:tiny")
    compress.apply(model, [compress.passes.Prune(structure="1:4")], progress=False)
    reloaded = compress.load(compress.save(model, tmp_path / "c"))
    assert reloaded.config.compression["passes"][0]["args"]["sparsity"] == 0.75
    ids = torch.randint(0, 8192, (1, 16))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-4)


def test_one_recipe_chains_every_pass(tmp_path):
    from compress.kvcache import GEARCache
    from compress.prune.sparse_linear import SparseLinear
    from compress.vq_logits.head import VQLogitsHead

    import yaml

    recipe = yaml.safe_load((RECIPES / "tiny-all.yaml").read_text())
    recipe["calibration"].update(num_samples=16, seq_len=128)  # the shipped recipe, with less calibration (CI time)
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "all"
    result = run("apply", tmp_path / "all.yaml", "--output", out, "--eval-windows", 4, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [p["name"] for p in summary["passes"]] == ["prune", "vq_logits", "gear_kv"]
    # packed 2:4 layers + a codebook head: the whole checkpoint shrinks below 0.6x of the dense one
    assert summary["checkpoint_bytes"] < 0.6 * summary["original_checkpoint_bytes"]
    model = compress.load(out)
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 42
    assert isinstance(model.lm_head, VQLogitsHead)
    ids = torch.randint(100, 8192, (1, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(gen.cache, GEARCache)
    assert summary["eval"]["kl"] > summary["eval"]["kv_cache"]["kl"] > 0


def test_a_pass_that_grows_the_stored_model_says_so(tmp_path):
    """int8 codes + scales + the mask after 50% unstructured pruning hold more than the packed sparse layers did."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: builtin:tiny\npasses:\n  - prune: {method: magnitude, sparsity: 0.5}\n"
                      "  - quantize: {method: rtn, bits: 8}\n")
    result = run("apply", recipe, "--output", tmp_path / "out", "--no-eval")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith("note: quantize made the stored model larger (13.37 MB -> ")


def test_apply_says_what_activation_sparsity_and_vq_logits_found():
    """Their figures were in --json / report.json only (an audit); apply prints them under the pass table."""
    from compress.cli_format import _found

    sparse = {"name": "activation_sparsity", "details": {"sparsity": 0.4237, "ppl_increase": 0.0098,
                                                         "target_ppl_increase": 0.01}}
    assert _found(sparse) == ("42.4% of the MLPs' neuron activations inactive on the calibration text, its "
                              "perplexity +0.98% (budget +1%)")
    vq = {"name": "vq_logits", "details": {"calibration_kl_copy": 0.7445, "calibration_kl_scale_bias": 0.4122}}
    assert _found(vq) == "calibration KL to the dense head: 0.7445 (copy) -> 0.4122 (scale/bias)"
    assert _found({"name": "prune", "details": {"sparsity": 0.5}}) is None


def test_a_perplexity_that_falls_reads_with_its_sign():
    """The activation-sparsity summary printed "+-0.04%" for a fall (an audit's find)."""
    from compress.cli_format import _found

    line = _found({"name": "activation_sparsity",
                   "details": {"sparsity": 0.5, "ppl_increase": -0.0004, "target_ppl_increase": 0.02}})
    assert "its perplexity -0.04% (budget +2%)" in line and "+-" not in line


def test_eval_speed_is_a_ratio_to_the_baseline_timed_in_turn(tmp_path):
    """tokens/s alone moves with the machine's load (the standard: ratios within one run); with a baseline, eval
    times both in turn (an audit's find)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - quantize: {method: rtn, bits: 4, group_size: 64}\n")
    assert run("apply", recipe, "--model", "builtin:tiny", "--output", tmp_path / "w4", "--no-eval").exit_code == 0
    out = json.loads(run("eval", tmp_path / "w4", "--max-windows", 1, "--json").stdout)
    assert out["baseline"] == "builtin:tiny" and out["tokens_per_second"] > 0 and out["baseline_tokens_per_second"] > 0
    # paired round by round, the order swapped every round (the model was always timed first): the median ratio
    rounds = out["speedup_rounds"]
    assert len(rounds) == 4 and out["speedup_vs_baseline"] == pytest.approx(sum(sorted(rounds)[1:3]) / 2)
    printed = run("eval", tmp_path / "w4", "--max-windows", 1).output
    assert "x over 4 rounds)" in " ".join(printed.split())
    alone = json.loads(run("eval", "builtin:tiny", "--max-windows", 1, "--json").stdout)
    assert alone["tokens_per_second"] > 0 and "speedup_vs_baseline" not in alone


def test_a_bold_head_that_itself_wraps_prints_plain_not_garbled():
    import io
    import textwrap

    from rich.console import Console

    from compress.cli_format import _print_wrapped

    head = "/tmp/some folder with spaces/and a rather long directory name/model-out"
    text = head + "  format 3 passes, 12 layers stored packed"
    out = io.StringIO()
    _print_wrapped(Console(file=out, width=60, force_terminal=False), text, 2, 4, bold=head)
    assert out.getvalue().rstrip("\n") == textwrap.fill(text, width=60, initial_indent="  ", subsequent_indent="      ",
                                                        break_long_words=False, break_on_hyphens=False)


def test_scoring_the_calibration_text_is_said(tmp_path):
    """A model calibrated on the text it is then scored on gets flattering numbers: apply and eval say so (from the
    checkpoint's sketch of its calibration text, whatever file held it), and say nothing on other text."""
    from compress.calibration import builtin_text

    text = tmp_path / "mine.txt"
    text.write_text(builtin_text("builtin:heldout")[:60_000])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: builtin:tiny\ncalibration: {{source: {text}, num_samples: 32, seq_len: 128}}\n"
                      "passes:\n  - prune: {method: wanda, structure: \"2:4\"}\n")
    out = tmp_path / "out"
    result = run("apply", recipe, "--output", out, "--eval-text", text, "--eval-windows", 8, "--json")
    assert result.exit_code == 0, result.output
    assert "calibrated or trained on" in result.stderr and json.loads(result.stdout)["eval"]["calibration_overlap"] > 0.05
    flattered = run("eval", out, "--text", text, "--max-windows", 8, "--no-speed", "--json")
    assert json.loads(flattered.stdout)["calibration_overlap"] > 0.05 and "calibrated or trained on" in flattered.stderr
    unrelated = tmp_path / "other.txt"
    unrelated.write_text(builtin_text("builtin:calibration")[-60_000:])
    other = run("eval", out, "--text", unrelated, "--max-windows", 8, "--no-speed", "--json")
    assert "calibration_overlap" not in json.loads(other.stdout) and "calibrated or trained on" not in other.stderr

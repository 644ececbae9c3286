"""The composed recipe end to end through the CLI (prune 2:4 + quantize 4-bit + vq_logits + gear_kv), its byte
budget in `compress inspect`, and `--format compressed-tensors` / `export:` from the command line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import compress
from compress.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_compose_all_runs_end_to_end_and_inspect_shows_one_budget(tmp_path):
    from compress.kvcache import GEARCache
    from compress.quantize.quantized_linear import QuantizedLinear
    from compress.vq_logits.head import VQLogitsHead

    recipe = yaml.safe_load((RECIPES / "compose-all.yaml").read_text())
    recipe["calibration"].update(num_samples=8, seq_len=128)  # the shipped recipe, with less calibration (CI time)
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "all"
    result = run("apply", tmp_path / "compose.yaml", "--output", out, "--eval-windows", 2, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [p["name"] for p in summary["passes"]] == ["prune", "quantize", "vq_logits", "gear_kv"]
    assert summary["passes"][1]["details"]["pruned_layers_kept_sparse"] == 42  # quantize composed with 2:4
    model = compress.load(out)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 42 and all(m.sparsity_structure == (2, 4) for m in layers)
    assert isinstance(model.lm_head, VQLogitsHead)
    with torch.no_grad():
        gen = model.generate(torch.arange(10, 90).unsqueeze(0), max_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
    assert isinstance(gen.cache, GEARCache)

    inspected = run("inspect", out, "--json")
    assert inspected.exit_code == 0, inspected.output
    budget = json.loads(inspected.stdout)["budget"]
    w = budget["weights"]
    assert w["mlp"]["stored"] < 0.35 * w["mlp"]["original"]  # 2:4 + 4-bit codes: ~0.3x of bf16
    assert w["head"]["stored"] < 0.5 * w["head"]["original"]  # 1024-entry codebook + codes + scale/bias
    assert w["embeddings"]["stored"] == w["embeddings"]["original"]
    kv = budget["kv_per_token"]
    assert kv["uncompressed"] == 2 * 6 * 2 * 64 * 2  # K and V, 6 layers, 2 KV heads of 64, fp16
    assert kv["compressed"] < 0.5 * kv["uncompressed"] and kv["cache"] == "gear 4-bit"
    table = run("inspect", out)
    assert "KV cache per token (gear 4-bit)" in table.output and "budget" in table.output
    # piped (120 columns): each pass's long argument list continues indented under its own line
    lines = table.stdout.splitlines()
    passes = [i for i, line in enumerate(lines) if line.startswith("  pass ")]
    assert [lines[i].split(":")[0] for i in passes] == ["  pass prune", "  pass quantize", "  pass vq_logits",
                                                        "  pass gear_kv"]
    assert all(lines[i + 1].startswith(("      ", "  pass ")) for i in passes[:-1]) and max(map(len, lines)) <= 120


def test_python_save_writes_the_format_of_the_recipe_apply_ran(tmp_path):
    """compress.apply(model, recipe) then compress.save wrote native whatever the recipe's `export:` said."""
    recipe = compress.Recipe.from_text("model: builtin:tiny\npasses:\n  - quantize: {method: rtn, bits: 4, "
                                       "group_size: 64}\nexport: {format: compressed-tensors}\n")
    model, _ = compress.apply(compress.load("builtin:tiny"), recipe, progress=False)
    compress.save(model, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    compress.save(model, tmp_path / "native", format="native")
    assert "quantization_config" not in json.loads((tmp_path / "native" / "config.json").read_text())
    # a later apply without an export request clears it (a stale one wrote, or failed on, the old format)
    compress.apply(model, [], progress=False)
    compress.save(model, tmp_path / "later")
    assert "quantization_config" not in json.loads((tmp_path / "later" / "config.json").read_text())
    with pytest.raises(compress.CompressError, match="format= takes 'native' or 'compressed-tensors', got 'gguf'"):
        compress.save(model, tmp_path / "x", format="gguf")
    assert not (tmp_path / "x").exists()
    # on the command line --format native still wins over the recipe's export
    (tmp_path / "ct.yaml").write_text(recipe.text)
    result = run("apply", tmp_path / "ct.yaml", "--output", tmp_path / "cli", "--no-eval", "--format", "native")
    assert result.exit_code == 0, result.output
    assert "quantization_config" not in json.loads((tmp_path / "cli" / "config.json").read_text())


def test_apply_format_compressed_tensors(tmp_path, monkeypatch):
    recipe = tmp_path / "w4.yaml"
    recipe.write_text("model: builtin:tiny\npasses:\n  - prune: {method: magnitude, structure: \"2:4\"}\n"
                      "  - quantize: {method: rtn, bits: 4, group_size: 64}\nexport: {format: compressed-tensors}\n")
    out = tmp_path / "ct"
    result = run("apply", recipe, "--output", out, "--no-eval", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["export"]["quantization_format"] == "pack-quantized"
    assert summary["export"]["quantized_modules"] == 42 and summary["export"]["sparsity_structure"] == "2:4"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["model_type"] == "llama"
    # an export as the model of another recipe: refused before any work (quantize crashed on its modules; gear_kv
    # wrote a checkpoint whose tensors did not match its config), by the dry run too
    kv = tmp_path / "kv.yaml"
    kv.write_text("passes:\n  - gear_kv: {bits: 4}\n")
    import compress.models

    loads, load = [], compress.models.load
    monkeypatch.setattr(compress.models, "load", lambda *a, **k: loads.append(k.get("meta", False)) or load(*a, **k))
    for extra in ([], ["--dry-run"]):
        refused = run("apply", kv, "--model", out, "--output", tmp_path / "kv", "--no-eval", *extra)
        assert refused.exit_code == 2 and "is a compressed-tensors export" in refused.output, refused.output
        assert not (tmp_path / "kv").exists()
        # from its config, before the weights load (which printed compressed-tensors' bars before the one line)
        assert loads == [True] and len(refused.stderr.strip().splitlines()) == 1, (loads, refused.stderr)
        loads.clear()
    monkeypatch.undo()
    # an export for other tools is replaced by --overwrite like any checkpoint compress wrote
    exported_weights = (out / "model.safetensors").read_bytes()
    again = run("apply", recipe, "--output", out, "--no-eval", "--json", "--format", "native", "--overwrite")
    assert again.exit_code == 0, again.output
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # `compress export` of the native checkpoint writes the files apply --format compressed-tensors wrote
    later = run("export", out, "-o", tmp_path / "ct2", "--json")
    assert later.exit_code == 0, later.output
    assert (tmp_path / "ct2" / "model.safetensors").read_bytes() == exported_weights
    assert json.loads(later.stdout)["export"]["quantized_modules"] == 42
    for args, message in [((tmp_path / "ct2", "-o", tmp_path / "x"), "is already a compressed-tensors export"),
                          (("builtin:tiny", "-o", tmp_path / "x"), "is not a checkpoint compress wrote"),
                          ((out, "-o", tmp_path / "ct2"), "already exists")]:
        refused = run("export", *args)
        assert refused.exit_code == 2 and message in refused.output, refused.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("how", ["flag", "recipe"])
def test_inexpressible_recipe_fails_before_any_work(tmp_path, how):
    out = tmp_path / "never"
    if how == "flag":
        result = run("apply", RECIPES / "compose-all.yaml", "--format", "compressed-tensors", "--output", out)
        assert "vq_logits" in result.output and "gear_kv" in result.output
    else:
        recipe = tmp_path / "r.yaml"
        recipe.write_text("model: builtin:tiny\ncalibration: {source: builtin:calibration}\npasses:\n"
                          "  - vq_logits: {num_codes: 64}\nexport: {format: compressed-tensors}\n")
        result = run("validate", recipe)
        assert f"{recipe}:4:5:" in result.output and "vq_logits" in result.output
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not out.exists()


def test_dry_run_says_what_compressed_tensors_would_store_dense_or_refuse(tmp_path):
    """--dry-run --format compressed-tensors passed a run the real one refused (every layer dense) and never named
    the layers a run would store dense; it says both now, as the run would, before any weight is read."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: builtin:tiny\npasses:\n  - quantize: {method: rtn, group_size: 100}\n")
    refused = CliRunner().invoke(main, ["apply", str(recipe), "--dry-run", "--format", "compressed-tensors",
                                        "-o", str(tmp_path / "out")])
    assert refused.exit_code == 2 and "would store every quantized layer dense (42" in refused.output, refused.output
    recipe.write_text("model: builtin:tiny\npasses:\n  - quantize: {method: rtn, group_size: 128}\n")
    planned = CliRunner().invoke(main, ["apply", str(recipe), "--dry-run", "--format", "compressed-tensors",
                                        "-o", str(tmp_path / "out")])
    assert planned.exit_code == 0 and "note:" in planned.output and "down_proj" in planned.output, planned.output
    assert not (tmp_path / "out").exists()


def test_export_that_would_store_every_layer_dense_is_refused_before_loading(tmp_path, reference_tokenizer,
                                                                           monkeypatch):
    """The group sizes and widths are in the checkpoint's structure: refused before its weights are read (at 7B the
    load took minutes first)."""
    from compress import models

    model, _ = compress.apply(compress.load("builtin:tiny"),
                              [compress.get_pass("quantize")(method="rtn", group_size=100)], progress=False)
    native = compress.save(model, tmp_path / "g100", tokenizer=reference_tokenizer)
    loads, load = [], models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: (loads.append(k.get("meta", False)), load(*a, **k))[1])
    refused = run("export", native, "-o", tmp_path / "ct")
    assert refused.exit_code == 2 and "would store every quantized layer dense (42" in refused.output
    assert loads == [True] and not (tmp_path / "ct").exists(), (loads, refused.output)  # the structure only


def test_export_of_an_inexpressible_native_checkpoint_gives_advice_it_can_follow(tmp_path, reference_tokenizer):
    """`compress export` of a linearized checkpoint: refused before any weight is read, without telling the user to
    "use the native format" (export has no other format: the checkpoint already is native)."""
    model, _ = compress.apply(compress.load("builtin:tiny"), [compress.get_pass("linearize")(variant="gla")],
                              progress=False)
    native = compress.save(model, tmp_path / "lin", tokenizer=reference_tokenizer)
    refused = run("export", native, "-o", tmp_path / "ct")
    assert refused.exit_code == 2 and "pass 'linearize'" in refused.output, refused.output
    assert "stays in the native format, which compress.load reads" in refused.output
    assert "use the native format" not in refused.output and not (tmp_path / "ct").exists()


def test_inspect_counts_an_export_whose_layers_stayed_dense_from_its_files(tmp_path, tiny_model):
    """inspect counted an export from the dense meta model at the checkpoint's dtype, while the layers it could not
    quantize are stored in float32 (an audit's find)."""
    from compress.checkpoint_validation import header_nbytes, read_header

    src = tmp_path / "src"
    tiny_model("qwen2", hidden_size=72, intermediate_size=100, head_dim=18).to(torch.bfloat16).save_pretrained(src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - quantize: {method: rtn, bits: 8, group_size: 36}\n"
                      "export: {format: compressed-tensors}\n")  # 36 divides rows of 72, not of 100 (down_proj)
    out = tmp_path / "ct"
    result = run("apply", recipe, "--model", src, "--output", out, "--no-eval", "--json")
    assert result.exit_code == 0, result.output
    # said before the work, and after it
    assert "note: stored dense in compressed-tensors, 3 layers (in_features 100 is not a multiple of group_size 36" \
        in result.stderr and json.loads(result.stdout)["export"]["stored_dense"]
    inspected = run("inspect", out, "--json")
    assert inspected.exit_code == 0, inspected.output
    counted = sum(v["dense"] + v["compressed"] for v in json.loads(inspected.stdout)["components"].values())
    assert counted == sum(header_nbytes(*info) for f in out.glob("*.safetensors") for info in read_header(f).values())
    table = " ".join(run("inspect", out).output.split())  # says what the folder is, which layers stayed dense
    assert "a compressed-tensors export (transformers and vLLM load it)" in table
    assert "stored dense (compressed-tensors needs whole groups): model.layers.0.mlp.down_proj" in table


def test_an_export_that_would_quantize_nothing_is_refused(tmp_path, tiny_model):
    """A group_size that divides no layer's width left every quantized layer dense float32: an 'export' larger than
    the unquantized model, exit 0, nothing said (an audit's find). Refused before any work by apply, and by export
    before writing; a native checkpoint's export says which layers stay dense."""
    src = tmp_path / "src"
    tiny_model("qwen2", hidden_size=72, intermediate_size=100, head_dim=18).to(torch.bfloat16).save_pretrained(src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - quantize: {method: rtn, bits: 8, group_size: 32}\n")  # 32 divides no width
    refused = run("apply", recipe, "--model", src, "--output", tmp_path / "ct", "--no-eval", "--format",
                  "compressed-tensors")
    assert refused.exit_code == 2 and "would store every quantized layer dense" in refused.stderr
    assert "Traceback" not in refused.output and not (tmp_path / "ct").exists()
    assert run("apply", recipe, "--model", src, "--output", tmp_path / "native", "--no-eval").exit_code == 0
    refused = run("export", tmp_path / "native", "-o", tmp_path / "ct")
    assert refused.exit_code == 2 and "would store every quantized layer dense" in refused.stderr
    assert not (tmp_path / "ct").exists()
    recipe.write_text("passes:\n  - prune: {structure: '2:4'}\n  - quantize: {method: rtn, bits: 8, group_size: 32}\n")
    assert run("apply", recipe, "--model", src, "--output", tmp_path / "pruned", "--no-eval").exit_code == 0
    refused = run("export", tmp_path / "pruned", "-o", tmp_path / "ct")  # pruned, so 'sparse': still nothing quantized
    assert refused.exit_code == 2 and "would store every quantized layer dense" in refused.stderr
    recipe.write_text("passes:\n  - quantize: {method: rtn, bits: 8, group_size: 36}\n")
    assert run("apply", recipe, "--model", src, "--output", tmp_path / "some", "--no-eval").exit_code == 0
    done = run("export", tmp_path / "some", "-o", tmp_path / "ct")
    assert done.exit_code == 0 and "stored dense in compressed-tensors, 3 layers (in_features 100" in done.output


def test_export_of_a_checkpoint_elsewhere_keeps_its_baseline(tmp_path):
    """The model a checkpoint was made from is recorded relative to its folder; `compress export` into another folder
    copied that relative path, so `compress eval` of the export looked for the baseline in the wrong place."""
    from compress.cli_eval import _recorded_source

    src = tmp_path / "src"
    compress.save(compress.load("builtin:tiny"), src, tokenizer=compress.load_tokenizer("builtin:tiny"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - quantize: {method: rtn, bits: 4, group_size: 64}\n")
    native = tmp_path / "deeper" / "native"
    assert run("apply", recipe, "--model", src, "--output", native, "--no-eval").exit_code == 0
    assert run("export", native, "-o", tmp_path / "ct").exit_code == 0
    assert _recorded_source(str(native)) == _recorded_source(str(tmp_path / "ct")) == str(src.resolve())


@pytest.mark.parametrize("field,value,message", [
    ("group_size", 64, "weight_scale holds 2 scale column(s) for 256 inputs, not the 4 its group scheme (group_size "
                       "64) gives"),
    ("num_bits", 8, "weight_packed holds 4 bits a weight, not num_bits 8")])
def test_inspect_finds_an_export_whose_quantization_config_was_edited(tmp_path, field, value, message):
    """generate and eval failed on it with one line (transformers' load), inspect reported it whole (an audit's
    find)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - quantize: {method: rtn, bits: 4, group_size: 128}\n")
    out = tmp_path / "ct"
    assert run("apply", recipe, "--model", "builtin:tiny", "--output", out, "--no-eval", "--format",
               "compressed-tensors").exit_code == 0
    assert run("inspect", out).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"][field] = value
    (out / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output, result.output
    assert "quantization_config does not match its tensors" in result.stderr


@pytest.mark.parametrize("dry_run", [False, True])
def test_apply_to_a_pruned_only_export_is_refused_before_any_work(tmp_path, dry_run):
    """A pruned-only export loads as plain dense layers while its record names packed tensors: apply on it wrote a
    checkpoint nothing could load (a helper's run), and said so only when evaluating it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - prune: {method: magnitude, sparsity: 0.5}\n")
    assert run("apply", recipe, "--model", "builtin:tiny", "--output", tmp_path / "native", "--no-eval").exit_code == 0
    assert run("export", tmp_path / "native", "-o", tmp_path / "ct").exit_code == 0
    again = tmp_path / "again.yaml"
    again.write_text("passes:\n  - prune: {method: magnitude, sparsity: 0.7}\n")
    result = CliRunner().invoke(main, ["apply", str(again), "--model", str(tmp_path / "ct"), "--output",
                                       str(tmp_path / "out"), "--no-eval"] + (["--dry-run"] if dry_run else []))
    assert result.exit_code == 2 and "is a compressed-tensors export (for vLLM/transformers)" in result.output
    assert "native checkpoint" in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("passes,structure,sparsity", [
    ("  - prune: {method: magnitude, sparsity: 0.3, storage: dense}\n", "unstructured", 0.3),
    # 2:4 over a sparser layer: some groups keep fewer than 2 (still 2:4; is_nm's "exactly 2" called it unstructured)
    ("  - prune: {method: magnitude, sparsity: 0.3, storage: dense}\n"
     "  - prune: {method: magnitude, structure: '2:4', storage: dense}\n", "2:4", 0.524),
])
def test_an_export_describes_layers_pruned_but_stored_dense(tmp_path, passes, structure, sparsity):
    """storage: dense (or auto at low sparsity) keeps a pruned layer's zeros in a plain weight; the export said
    'sparse_modules 0, global_sparsity 0.0' and wrote no sparsity description for them (a helper's run)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n" + passes)
    assert run("apply", recipe, "--model", "builtin:tiny", "--output", tmp_path / "native", "--no-eval").exit_code == 0
    summary = json.loads(run("export", tmp_path / "native", "-o", tmp_path / "ct", "--json").stdout)["export"]
    assert summary["sparse_modules"] == 42 and summary["sparsity_structure"] == structure
    assert summary["global_sparsity"] == pytest.approx(sparsity, abs=1e-3)
    sparsity = json.loads((tmp_path / "ct" / "config.json").read_text())["compression"]["sparsity"]
    assert sparsity["format"] == "dense" and len(sparsity["targets"]) == 42


@pytest.mark.parametrize("name,content,message", [
    ("report.json", b"[1, 2]", "report.json: not readable JSON (a JSON list, not an object)"),
    ("recipe.yaml", b"model: \xff\xfe\n", "recipe.yaml: not UTF-8 text"),
])
def test_export_refuses_edited_companion_files_before_loading(tmp_path, monkeypatch, name, content, message):
    """An edited report.json / recipe.yaml crashed the export with a traceback after all the work (helper's find)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - quantize: {method: rtn, bits: 4, group_size: 64}\n")
    native = tmp_path / "native"
    assert run("apply", recipe, "--model", "builtin:tiny", "--output", native, "--no-eval").exit_code == 0
    (native / name).write_bytes(content)
    from compress import models

    loads = []
    real_load = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: loads.append(k.get("meta")) or real_load(*a, **k))
    result = CliRunner().invoke(main, ["export", str(native), "-o", str(tmp_path / "ct")])
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "ct").exists()
    assert loads == [True]  # the structure only: no weights read

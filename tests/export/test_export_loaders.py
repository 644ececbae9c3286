"""What `compress export` and `compress inspect` say about who loads an export: an asymmetric quantization is
written int-quantized (transformers loads it, vLLM does not), a native bitsandbytes checkpoint loads in plain
transformers as it is, and the budget's original side counts the layers an export upcast at the model's dtype."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import compress
from compress.checkpoint_validation import header_nbytes, read_header
from compress.cli import main
from compress.export.compressed_tensors import vllm_unloadable_formats

pytest.importorskip("compressed_tensors")
SCRIPT = Path(__file__).with_name("plain_transformers.py")
IDS = torch.arange(3, 67).unsqueeze(0)  # the ids plain_transformers.py feeds


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def native(tmp_path, name: str, quantize: str):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(f"model: builtin:tiny\npasses:\n  - quantize: {{{quantize}}}\n")
    out = tmp_path / name
    result = run("apply", recipe, "--output", out, "--no-eval")
    assert result.exit_code == 0, result.output
    return out


def header_bytes(folder) -> int:
    return sum(header_nbytes(*info) for f in folder.glob("*.safetensors") for info in read_header(f).values())


def test_an_asymmetric_export_says_vllm_cannot_load_it(tmp_path):
    """Asymmetric codes are written int-quantized (one per byte): vLLM ends at 'No compressed-tensors compatible
    scheme was found' and the export is larger than the native checkpoint; export and inspect said nothing of it and
    inspect called it an export 'transformers and vLLM load' (a tester's find)."""
    asym = native(tmp_path, "asym", "method: rtn, bits: 4, group_size: 64, symmetric: false")
    result = run("export", asym, "-o", tmp_path / "asym-ct")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "note: 42 layers written int-quantized (model.layers.0.self_attn.q_proj" in said
    assert "transformers loads this export, vLLM does not" in said and "quantize with symmetric: true" in said
    assert "larger than in the native checkpoint" in said and header_bytes(tmp_path / "asym-ct") > header_bytes(asym)
    again = run("export", asym, "-o", tmp_path / "asym-json", "--json")
    exported = json.loads(again.stdout)["export"]
    assert len(exported["int_quantized"]) == 42 and "vLLM does not" in exported["note"]
    config = json.loads((tmp_path / "asym-ct" / "config.json").read_text())
    assert vllm_unloadable_formats(config["quantization_config"]) == ["int-quantized"]
    table = " ".join(run("inspect", tmp_path / "asym-ct").output.split())
    assert "a compressed-tensors export (transformers loads it; vLLM does not" in table
    assert "vLLM load it" not in table
    assert json.loads(run("inspect", tmp_path / "asym-ct", "--json").stdout)["vllm_unloadable"] == ["int-quantized"]
    # symmetric: packed, loaded by both, nothing to note
    sym = native(tmp_path, "sym", "method: rtn, bits: 4, group_size: 64")
    result = run("export", sym, "-o", tmp_path / "sym-ct", "--json")
    exported = json.loads(result.stdout)["export"]
    # the input's size is the native checkpoint's ("original" named the uncompressed model in apply's --json)
    sizes = json.loads(result.stdout)
    from compress.checkpoint import folder_bytes

    assert "original_checkpoint_bytes" not in sizes and sizes["native_checkpoint_bytes"] == folder_bytes(sym)
    assert exported["note"] is None and exported["int_quantized"] == []
    assert "(transformers and vLLM load it)" in " ".join(run("inspect", tmp_path / "sym-ct").output.split())


def test_an_8bit_asymmetric_export_claims_no_size_penalty(tmp_path):
    """8-bit codes take a byte natively too: the note says vLLM, not 'larger'."""
    asym = native(tmp_path, "a8", "method: rtn, bits: 8, group_size: 64, symmetric: false")
    exported = json.loads(run("export", asym, "-o", tmp_path / "a8-ct", "--json").stdout)["export"]
    assert "vLLM does not" in exported["note"] and "larger" not in exported["note"]
    # apply --format compressed-tensors writes the same summary: its --json carries the note too
    applied = run("apply", tmp_path / "a8.yaml", "--output", tmp_path / "a8-apply", "--no-eval", "--json", "--format",
                  "compressed-tensors")
    assert applied.exit_code == 0 and json.loads(applied.stdout)["export"]["note"] == exported["note"]
    printed = run("apply", tmp_path / "a8.yaml", "--output", tmp_path / "a8-apply", "--no-eval", "--overwrite",
                  "--format", "compressed-tensors")  # and its table says it too
    assert printed.exit_code == 0 and "vLLM does not" in " ".join(printed.stdout.split())


def test_a_mixed_precision_export_names_only_its_asymmetric_layers(tmp_path):
    """One symmetric and one asymmetric quantize pass: format mixed-precision, each group naming its own format
    (vLLM reads the group's); the int-quantized group is what vLLM cannot build."""
    quantize = compress.get_pass("quantize")
    model, _ = compress.apply(compress.load("builtin:tiny"), [
        quantize(method="rtn", bits=4, group_size=64, targets=["re:.*mlp.*"]),
        quantize(method="rtn", bits=4, group_size=64, symmetric=False, targets=["re:.*self_attn.*"])],
        progress=False)
    from compress.export.compressed_tensors import export

    summary = export(model, tmp_path / "mixed")
    assert summary.format == "mixed-precision"
    assert len(summary.int_quantized) == 24 and all("self_attn" in n for n in summary.int_quantized)
    assert summary.note.startswith("24 layers written int-quantized")
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())
    assert vllm_unloadable_formats(config["quantization_config"]) == ["int-quantized"]
    # a group without its own format takes the config's; activation-quantized groups are not weight-only
    groups = {"g": {"weights": {"num_bits": 4}, "targets": ["Linear"]}}
    assert vllm_unloadable_formats({"quant_method": "compressed-tensors", "format": "pack-quantized",
                                    "config_groups": groups}) == []
    assert vllm_unloadable_formats({"quant_method": "compressed-tensors", "format": "int-quantized",
                                    "config_groups": groups}) == ["int-quantized"]
    assert vllm_unloadable_formats({"quant_method": "bitsandbytes"}) == []


def test_an_export_stores_ragged_layers_exactly_and_inspect_counts_them_at_the_original_dtype(tmp_path):
    """group_size 128 leaves the down_proj layers (704 wide) dense: the export stores them float32, code x scale
    exactly (a loader rounds once to what it computes in; bf16 storage changed float32 logits by 3e-3), and inspect
    counted the original's down_proj at float32 too (19.41 MB 'original' for a 17.24 MB bf16 model, a tester's
    find). The original side is what the native checkpoint's source stored."""
    g128 = native(tmp_path, "g128", "method: rtn, bits: 4, group_size: 128")
    done = run("export", g128, "-o", tmp_path / "ct")
    assert done.exit_code == 0 and "a group_size dividing 704 keeps it quantized" in " ".join(done.output.split())
    from safetensors import safe_open

    from compress.state_files import weight_files

    model = compress.load(g128, dtype="float32")
    for file in weight_files(tmp_path / "ct"):
        with safe_open(str(file), "pt") as f:
            for key in (k for k in f.keys() if k.endswith("mlp.down_proj.weight")):
                exact = model.get_submodule(key.removesuffix(".weight")).dequantized_weight(torch.float32)
                assert torch.equal(f.get_tensor(key), exact), key
    inspected = json.loads(run("inspect", tmp_path / "ct", "--json").stdout)["budget"]
    from_native = json.loads(run("inspect", g128, "--json").stdout)["budget"]
    assert inspected["weights_total"]["original"] == from_native["weights_total"]["original"]
    assert inspected["weights"]["mlp"]["original"] == from_native["weights"]["mlp"]["original"]
    assert inspected["weights_total"]["stored"] == header_bytes(tmp_path / "ct")


def test_a_bitsandbytes_checkpoint_is_said_to_load_in_plain_transformers(tmp_path):
    """`compress export` of an NF4 checkpoint said only that compress.load reads it; transformers'
    from_pretrained loads it as it is (the layout its bitsandbytes integration writes)."""
    pytest.importorskip("bitsandbytes")
    nf4 = native(tmp_path, "nf4", "method: nf4, bnb_blocksize: 64")
    refused = run("export", nf4, "-o", tmp_path / "ct")
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "stays in the native format, which compress.load reads" in said
    assert "plain transformers too" in said and "AutoModelForCausalLM.from_pretrained loads it" in said
    # and it does: plain transformers (a process without compress) gives the logits compress.load gives
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"folder": str(nf4), "out": str(tmp_path / "plain_nf4")}]))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(jobs)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and (tmp_path / "plain_nf4.safetensors").exists(), proc.stderr[-3000:]
    with torch.no_grad():
        ours = compress.load(nf4, dtype="float32")(IDS).logits[0]
    plain = load_file(tmp_path / "plain_nf4.safetensors")["logits"].float()  # (bnb keeps the bf16 head: bf16 logits)
    torch.testing.assert_close(plain, ours.float(), atol=0.1, rtol=0.02)
    # a checkpoint marked native (transformers refuses it) gets no such claim
    config = json.loads((nf4 / "config.json").read_text())
    from compress.export.native_marker import NATIVE_ONLY_MODEL_TYPE

    (nf4 / "config.json").write_text(json.dumps({**config, "compress_model_type": config["model_type"],
                                                 "model_type": NATIVE_ONLY_MODEL_TYPE}))
    refused = run("export", nf4, "-o", tmp_path / "ct")
    assert refused.exit_code == 2 and "plain transformers" not in refused.output


def test_an_export_inside_the_original_model_s_folder_is_refused(tmp_path):
    """apply refuses an output inside the model it reads; export, which reads the checkpoint, wrote into the folder
    of the model the checkpoint was made from (a tester's find)."""
    import shutil

    original = tmp_path / "original"
    shutil.copytree(Path(compress.__file__).parent / "builtin" / "tiny", original)
    recipe = tmp_path / "w4.yaml"
    recipe.write_text("passes:\n  - quantize: {method: rtn, bits: 4, group_size: 64}\n")
    assert run("apply", recipe, "--model", original, "--output", tmp_path / "w4", "--no-eval").exit_code == 0
    before = sorted(p.name for p in original.iterdir())
    refused = run("export", tmp_path / "w4", "-o", original / "ct")
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "is inside the folder of the model it was made from" in said, said
    assert sorted(p.name for p in original.iterdir()) == before
    # the original need not be whole for the check (the export never reads it): its config.json moved away
    (original / "config.json").rename(tmp_path / "config.json")
    refused = run("export", tmp_path / "w4", "-o", original / "ct")
    assert refused.exit_code == 2 and "inside the folder of the model it was made from" in " ".join(
        refused.output.split()), refused.output
    assert run("export", tmp_path / "w4", "-o", tmp_path / "ct").exit_code == 0


def test_fused_projections_in_different_schemes_are_said_to_stop_vllm(tmp_path):
    """vLLM fuses q/k/v (and gate/up) into one layer and refuses shards of different schemes ("vLLM requires all to
    use the same scheme"): quantizing q_proj alone exported with nothing said (a tester's find)."""
    only_q = native(tmp_path, "q", "method: rtn, bits: 4, group_size: 64, targets: ['re:.*q_proj$']")
    exported = json.loads(run("export", only_q, "-o", tmp_path / "q-ct", "--json").stdout)["export"]
    assert exported["vllm_mixed_fused"] == [f"model.layers.{i}.self_attn.q_proj/k_proj/v_proj" for i in range(6)]
    assert "vLLM refuses it" in exported["note"] and "Quantize the fused projections alike" in exported["note"]
    said = " ".join(run("export", only_q, "-o", tmp_path / "q-ct2").output.split())
    assert "vLLM fuses q/k/v and gate/up" in said
    # gate at other bits than up: the same for gate_up_proj
    two = tmp_path / "two.yaml"
    two.write_text("model: builtin:tiny\npasses:\n  - quantize: {method: rtn, bits: 4, group_size: 64, targets: "
                   "['re:.*gate_proj$']}\n  - quantize: {method: rtn, bits: 8, group_size: 64, targets: "
                   "['re:.*up_proj$']}\n")
    assert run("apply", two, "--output", tmp_path / "two", "--no-eval").exit_code == 0
    exported = json.loads(run("export", tmp_path / "two", "-o", tmp_path / "two-ct", "--json").stdout)["export"]
    assert exported["vllm_mixed_fused"] == [f"model.layers.{i}.mlp.gate_proj/up_proj" for i in range(6)]
    every = native(tmp_path, "all", "method: rtn, bits: 4, group_size: 64")
    exported = json.loads(run("export", every, "-o", tmp_path / "all-ct", "--json").stdout)["export"]
    assert exported["vllm_mixed_fused"] == [] and exported["note"] is None

"""Checkpoints as other tools see them: compressed-tensors exports load in plain transformers (in a process that
never imports compress) with the logits compress computes; native checkpoints with packed layers refuse to load
there with a message naming compress.load, and still load through compress.load.

Tolerance: logits within 1e-4 (absolute and relative; the layouts hold the same numbers, so in practice they are
equal). One subprocess loads every folder, to keep the suite fast."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import compress
from compress.errors import ExportError
from compress.export.compressed_tensors import export
from compress.export.native_marker import NATIVE_MODEL_TYPE, NATIVE_ONLY_MODEL_TYPE, mark_native
from compress.pass_api import replace_module
from compress.prune.sparse_linear import SparseLinear
from compress.quantize.int_quant import quantize_rtn
from compress.quantize.quantized_linear import QuantizedLinear

pytest.importorskip("compressed_tensors")
SCRIPT = Path(__file__).with_name("plain_transformers.py")
IDS = torch.arange(3, 67).remainder(8000).unsqueeze(0)  # the ids plain_transformers.py feeds
TOL = dict(atol=1e-4, rtol=1e-4)


def quantize_layers(model, bits: int, group_size: int, symmetric: bool) -> None:
    """Round-to-nearest QuantizedLinear for every decoder Linear (pruned ones keep their mask and structure)."""
    for name, module in list(model.named_modules()):
        if ".layers." not in name or not isinstance(module, (torch.nn.Linear, SparseLinear)):
            continue
        sparse = isinstance(module, SparseLinear)
        weight = module.dense_weight() if sparse else module.weight.detach()
        mask = weight != 0 if sparse else None
        codes, scales, zeros = quantize_rtn(weight, bits, group_size, symmetric, torch.bfloat16, mask=mask)[:3]
        nm = (module.n, module.m) if sparse and module.format == "nm" else None
        replace_module(model, name, QuantizedLinear.from_codes(codes, scales, zeros, bits=bits, group_size=group_size,
                                                               mask=mask, nm=nm))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Build every variant once, write its folders, and run the plain-transformers process over all of them."""
    root = tmp_path_factory.mktemp("formats")
    base = compress.load("builtin:tiny", dtype="float32")
    prune = compress.get_pass("prune")
    variants = {}
    m24, _ = compress.apply(copy.deepcopy(base), [prune(method="magnitude", structure="2:4")], progress=False)
    variants["sparse24"] = m24
    # 2:4, then LoRA recovery merged into the packed weights (masked: the layers stay 2:4)
    variants["sparse24_recovered"], _ = compress.apply(
        copy.deepcopy(m24), [compress.get_pass("recover")(max_tokens=256, batch_size=2, lr=1e-2)],
        calibration={"source": "builtin:calibration", "num_samples": 4, "seq_len": 32},
        tokenizer=compress.load_tokenizer("builtin:tiny"), progress=False)
    unstructured, _ = compress.apply(copy.deepcopy(base), [prune(method="magnitude", sparsity=0.6, storage="packed")],
                                     progress=False)
    variants["bitmask"] = unstructured
    w4 = copy.deepcopy(m24)
    quantize_layers(w4, bits=4, group_size=64, symmetric=True)
    variants["w4_24"] = w4
    w8 = copy.deepcopy(base)
    quantize_layers(w8, bits=8, group_size=10**6, symmetric=False)  # channel-wise, asymmetric
    variants["w8_asym"] = w8
    ragged = copy.deepcopy(base)
    quantize_layers(ragged, bits=4, group_size=128, symmetric=True)  # down_proj: 704 = 5.5 groups
    variants["w4_g128"] = ragged
    for name, passes in tied_variants().items():  # heads tied to the embedding (Qwen2-0.5B, Llama-3.2-1B, ...)
        variants[name], _ = compress.apply(tied_model(), passes, progress=False)
    out = {"reference": {k: logits(v) for k, v in variants.items()}, "summary": {}, "root": root}
    jobs = []
    for name, model in variants.items():
        out["summary"][name] = export(model, root / f"ct_{name}")
        jobs.append({"folder": str(root / f"ct_{name}"), "out": str(root / f"plain_ct_{name}")})
    jobs.append({"folder": str(root / "ct_w4_24"), "out": str(root / "plain_ct_w4_24_dequantize"), "dequantize": True})
    compress.save(variants["w4_24"], root / "ct_w4_24_sharded", format="compressed-tensors", max_shard_bytes="64KB")
    jobs.append({"folder": str(root / "ct_w4_24_sharded"), "out": str(root / "plain_ct_w4_24_sharded")})
    for name in ("sparse24", "bitmask", *tied_variants()):
        compress.save(variants[name], root / f"native_{name}")
        jobs.append({"folder": str(root / f"native_{name}"), "out": str(root / f"plain_native_{name}")})
    compress.save(base, root / "native_dense")
    jobs.append({"folder": str(root / "native_dense"), "out": str(root / "plain_native_dense")})
    out["reference"]["dense"] = logits(base)
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(root / "jobs.json")], capture_output=True, text=True,
                          timeout=1200)  # a loaded shared machine; ~30 s idle
    assert proc.returncode == 0, proc.stderr[-3000:]
    out["variants"] = variants
    return out


def tied_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def tied_variants() -> dict:
    return {"tied_w4_head": [compress.get_pass("quantize")(method="rtn", bits=4, group_size=64, ignore=[])],
            "tied_24_head": [compress.get_pass("prune")(method="magnitude", structure="2:4",
                                                        ignore=["re:.*embed_tokens"])]}


def layer_bytes(folder: Path) -> int:
    """Bytes of the decoder layers' tensors in a folder's model.safetensors (embeddings and head left out)."""
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys() if ".layers." in k)


def plain(folders, name: str) -> torch.Tensor:
    path = folders["root"] / f"plain_{name}.safetensors"
    assert path.exists(), (folders["root"] / f"plain_{name}.error.txt").read_text()
    return load_file(path)["logits"]


@pytest.mark.parametrize("variant", ["sparse24", "sparse24_recovered", "bitmask", "w4_24", "w8_asym", "w4_g128"])
def test_compressed_tensors_export_matches_in_plain_transformers(folders, variant):
    torch.testing.assert_close(plain(folders, f"ct_{variant}"), folders["reference"][variant], **TOL)


def test_a_merged_recovery_exports_as_the_pruned_layers_it_changed(folders):
    """recover (merge: true) after 2:4: the LoRA update is in the exported weights, which stay 2:4."""
    recovered, pruned = folders["reference"]["sparse24_recovered"], folders["reference"]["sparse24"]
    assert (recovered - pruned).abs().max() > 1e-3  # the recovery changed the model
    summary = folders["summary"]["sparse24_recovered"]
    assert summary.sparsity_structure == "2:4" and len(summary.sparse) == 42


@pytest.mark.parametrize("variant", ["tied_w4_head", "tied_24_head"])
def test_a_tied_head_is_untied_before_it_is_compressed(folders, variant):
    """A helper's audit: a quantized head whose config still said tied could not be loaded (transformers and
    compress.load tied the embedding back over it); pruning a tied head zeroed half the input embedding too, even
    with the embedding in `ignore`. Now the head gets its own weight first: the embedding keeps the original's."""
    model = folders["variants"][variant]
    assert not model.config.tie_word_embeddings
    # built in code in float32 with no dtype in its config: it stays float32 (bf16 was assumed, and every weight
    # rounded to it)
    original = tied_model().get_input_embeddings().weight.detach()
    assert torch.equal(model.get_input_embeddings().weight, original)
    assert isinstance(model.get_output_embeddings(), (SparseLinear, QuantizedLinear))  # the head was compressed
    torch.testing.assert_close(plain(folders, f"ct_{variant}"), folders["reference"][variant], **TOL)
    torch.testing.assert_close(logits(compress.load(folders["root"] / f"native_{variant}", dtype="float32")),
                               folders["reference"][variant], **TOL)
    # inspect's budget counts the original's head once (it counted it twice: the untie was not recorded)
    from compress.cli_inspect import inspect_checkpoint

    original = tied_model()
    once = sum(t.numel() * t.element_size() for t in {id(p): p for p in original.parameters()}.values())
    budget = inspect_checkpoint(str(folders["root"] / f"native_{variant}"), "auto", "cpu")["budget"]
    assert budget["weights_total"]["original"] == once


def test_a_sharded_export_loads_in_plain_transformers(folders):
    """compress.save(format="compressed-tensors", max_shard_bytes=...) shards as a native save does, and
    transformers reads the shards and their index."""
    folder = folders["root"] / "ct_w4_24_sharded"
    assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("model-*.safetensors"))) > 2
    torch.testing.assert_close(plain(folders, "ct_w4_24_sharded"), folders["reference"]["w4_24"], **TOL)


def test_native_reload_matches_the_model_that_was_exported(folders):
    """compress.load of the native checkpoint = the in-memory model the ct export was made from."""
    for name in ("sparse24", "bitmask"):
        torch.testing.assert_close(logits(compress.load(folders["root"] / f"native_{name}", dtype="float32")),
                                   folders["reference"][name], **TOL)


def test_dequantize_on_load_path(folders):
    """transformers' CompressedTensorsConfig(dequantize=True): compressed-tensors' compressor decompresses each
    weight while loading (another code path than the first-forward decompression), in the dtype of the stored
    scales (bf16): the reference is our model with its dequantized weights rounded to bf16."""
    model = copy.deepcopy(folders["variants"]["w4_24"])
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight.data = module.dequantized_weight(torch.bfloat16).float()
            replace_module(model, name, linear)
    torch.testing.assert_close(plain(folders, "ct_w4_24_dequantize"), logits(model), **TOL)


@pytest.mark.parametrize("variant", ["w4_24", "w8_asym"])
def test_compressed_tensors_decompressor_gives_our_weights_bit_for_bit(folders, variant):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    folder = folders["root"] / f"ct_{variant}"
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(qconfig["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry(qconfig["format"])
    model = folders["variants"][variant]
    checked = 0
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        for name, module in model.named_modules():
            if not isinstance(module, QuantizedLinear):
                continue
            local = {k.rpartition(".")[2]: f.get_tensor(k) for k in f.keys() if k.rpartition(".")[0] == name}
            local["weight_scale"] = local["weight_scale"].float()
            weight = compressor.decompress(local, scheme)["weight"]
            assert torch.equal(weight.float(), module.dequantized_weight(torch.float32)), name
            checked += 1
    assert checked == 42


def test_quantization_config_is_what_llm_compressor_writes(folders):
    config = json.loads((folders["root"] / "ct_w4_24" / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed" and q["sparsity_config"] == {} and q["ignore"] == ["lm_head"]
    weights = q["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"], weights["symmetric"]) == (4, 64, "group", True)
    assert config["model_type"] == "llama"
    sparsity = config["compression"]["sparsity"]
    assert sparsity["format"] == "dense" and sparsity["sparsity_structure"] == "2:4"
    assert sparsity["global_sparsity"] == pytest.approx(0.5)
    # decoder layers: packed int4 + bf16 scales per 64 (4.25 bits/weight) vs the native bf16 2:4 (9 bits/weight)
    ct = layer_bytes(folders["root"] / "ct_w4_24")
    assert ct < 0.5 * layer_bytes(folders["root"] / "native_sparse24")
    # pruning alone has no compressed-tensors layout any loader reads now: stored dense, no quantization_config
    sparse_only = json.loads((folders["root"] / "ct_sparse24" / "config.json").read_text())
    assert "quantization_config" not in sparse_only
    assert sparse_only["compression"]["sparsity"]["sparsity_structure"] == "2:4"


def test_ragged_groups_are_stored_dense_and_named(folders):
    summary = folders["summary"]["w4_g128"]
    assert sorted(summary.dense_fallback) == [f"model.layers.{i}.mlp.down_proj" for i in range(6)]
    q = json.loads((folders["root"] / "ct_w4_g128" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in q["ignore"]


def test_compress_load_reads_an_export_through_transformers(folders):
    torch.testing.assert_close(logits(compress.load(folders["root"] / "ct_w4_24", dtype="float32")),
                               folders["reference"]["w4_24"], **TOL)


@pytest.mark.parametrize("name", ["ct_w4_24", "ct_sparse24"])
def test_inspect_reads_a_compressed_tensors_export(folders, name):
    """transformers builds these layers, so inspect counts the files' tensors (it refused them as not matching
    their config): the stored total is the bytes of the tensors on disk, the MLP and attention compressed."""
    from click.testing import CliRunner

    from compress.cli import main

    folder = folders["root"] / name
    result = CliRunner().invoke(main, ["inspect", str(folder), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    on_disk = sum(t.numel() * t.element_size() for f in folder.glob("*.safetensors") for t in load_file(f).values())
    assert out["budget"]["weights_total"]["stored"] == on_disk
    if name == "ct_w4_24":  # quantized: packed codes (the sparse-only export stores dense values)
        assert out["components"]["mlp"]["compressed"] > 0 and out["components"]["mlp"]["dense"] == 0
        assert out["budget"]["weights_total"]["stored"] < out["budget"]["weights_total"]["original"]


@pytest.mark.parametrize("variant", ["sparse24", "bitmask"])
def test_native_packed_checkpoint_refuses_plain_transformers(folders, variant):
    assert not (folders["root"] / f"plain_native_{variant}.safetensors").exists()
    message = (folders["root"] / f"plain_native_{variant}.error.txt").read_text()
    assert "compress.load" in message
    assert json.loads((folders["root"] / f"native_{variant}" / "config.json").read_text())["model_type"] == NATIVE_MODEL_TYPE


def test_marker_suggests_the_export_only_where_it_works(folders, tmp_path):
    """transformers' error shows the marker: a checkpoint with a pass compressed-tensors cannot hold (here a codebook
    head recorded after the prune) must not send the user to an export that refuses it; either marker reloads."""
    import shutil

    model = folders["variants"]["sparse24"]
    config = model.config.to_dict()
    mark_native(config, model)
    assert config["model_type"] == NATIVE_MODEL_TYPE
    config = model.config.to_dict()
    config["compression"] = {**config["compression"],
                             "passes": config["compression"]["passes"] + [{"pass": "vq_logits", "args": {}}]}
    mark_native(config, model)
    assert config["model_type"] == NATIVE_ONLY_MODEL_TYPE and "compressed-tensors" not in config["model_type"]
    folder = tmp_path / "only"
    shutil.copytree(folders["root"] / "native_sparse24", folder)
    on_disk = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**on_disk, "model_type": NATIVE_ONLY_MODEL_TYPE}))
    torch.testing.assert_close(logits(compress.load(folder, dtype="float32")), folders["reference"]["sparse24"], **TOL)


def test_dense_native_checkpoint_still_loads_in_plain_transformers(folders):
    torch.testing.assert_close(plain(folders, "native_dense"), folders["reference"]["dense"], **TOL)


def test_checkpoint_without_the_marker_still_loads(folders, tmp_path):
    """Checkpoints written before the marker existed keep loading through compress.load."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(folders["root"] / "native_sparse24", old)
    config = json.loads((old / "config.json").read_text())
    config["model_type"] = config.pop("compress_model_type")
    (old / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(logits(compress.load(old, dtype="float32")), folders["reference"]["sparse24"], **TOL)


def test_inexpressible_pass_fails_before_writing(folders, tmp_path):
    model = copy.deepcopy(folders["variants"]["sparse24"])
    model.config.compression = {**model.config.compression,
                                "passes": model.config.compression["passes"] + [{"pass": "vq_logits", "args": {}}]}
    with pytest.raises(ExportError, match="vq_logits"):
        export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unmerged_recovery_is_refused_before_writing(folders, tmp_path):
    model = copy.deepcopy(folders["variants"]["sparse24"])
    model.config.compression = {**model.config.compression, "passes": model.config.compression["passes"]
                                + [{"pass": "recover", "args": {"merge": False}}]}
    with pytest.raises(ExportError, match=r"'recover' \(merge: false\): its LoRA adapter folder"):
        export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()

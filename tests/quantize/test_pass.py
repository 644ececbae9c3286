"""The quantize pass's arguments, targets and skips, and its user errors."""
import pytest
import torch

import compress
from compress.errors import ConfigError
from compress.quantize import QuantizedLinear


def quantize(**args):
    return compress.get_pass("quantize")(**args)


@pytest.mark.parametrize("args,message", [
    (dict(method="rtn", act_order=True), "does not take act_order"),
    (dict(method="nf4", bits=8), "does not take bits"),
    (dict(method="gptq", threshold=3.0), "does not take threshold"),
    (dict(group_size=0), "group_size is a positive number"),
    (dict(bits=3), "bits"),
])
def test_bad_arguments_are_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        quantize(**args)


@pytest.mark.parametrize("method,kept,dropped", [
    ("nf4", {"bnb_blocksize", "double_quant", "compute_dtype"}, {"bits", "group_size", "act_order", "threshold"}),
    ("rtn", {"bits", "group_size", "symmetric"}, {"act_order", "bnb_blocksize", "threshold"}),
    ("gptq", {"bits", "act_order", "dampening"}, {"bnb_blocksize", "compute_dtype", "threshold"}),
])
def test_the_record_names_only_the_methods_options(method, kept, dropped):
    """An nf4 run recorded bits=4, group_size=128, act_order ... (every field) in config.json and inspect; the
    record rebuilds the same pass."""
    p = quantize(method=method)
    args = p.entry()["args"]
    assert kept <= set(args) and not dropped & set(args) and args["method"] == method
    assert quantize(**args).config == p.config


def test_gptq_outside_decoder_layers_and_non_linear_targets(tiny_model):
    model = tiny_model("llama", vocab_size=8192)  # the built-in tokenizer calibrates it
    with pytest.raises(ConfigError, match="outside the decoder layers"):
        compress.apply(model, [quantize(method="gptq", ignore=[])], calibration={"source": "builtin:calibration"},
                       tokenizer=compress.load_tokenizer("builtin:tiny"), progress=False)
    with pytest.raises(ConfigError, match="targets Linear layers"):
        quantize(method="rtn", targets=["model.layers.0.mlp"]).describe(model)


def test_rtn_composes_with_pruning_and_skips_what_is_quantized(tiny_model):
    model = tiny_model("llama")
    compress.apply(model, [compress.get_pass("prune")(method="magnitude", structure="2:4",
                                                        targets=["re:.*mlp\\..*"], storage="packed")], progress=False)
    _, report = compress.apply(model, [quantize(method="rtn", group_size=32, symmetric=False)], progress=False)
    details = report.passes[0].details
    assert details["pruned_layers_kept_sparse"] == 9 and len(report.passes[0].modules) == 21
    mlp = model.model.layers[0].mlp.up_proj
    assert isinstance(mlp, QuantizedLinear) and mlp.sparsity_structure == (2, 4) and mlp.zero_points() is not None
    # a second quantize pass finds nothing left to quantize, and says so
    with pytest.raises(ConfigError, match="already quantized"):
        compress.apply(model, [quantize(method="rtn", targets=["QuantizedLinear"])], progress=False)


def test_a_second_quantize_names_the_layers_an_earlier_one_quantized(tiny_model):
    """8-bit attention, then 4-bit with the default targets: the second skipped the attention layers silently (its
    `Linear` target never matched a QuantizedLinear), where the README promises a line per skip reason."""
    model, report = compress.apply(tiny_model("llama"), [
        quantize(method="rtn", bits=8, group_size=32, targets=["re:.*self_attn\\..*_proj"]),
        quantize(method="rtn", bits=4, group_size=32)], progress=False)
    second = report.passes[1]
    assert len(second.modules) == 9 and len(second.skipped) == 12
    assert set(second.skipped.values()) == {"already quantized"}
    assert model.model.layers[0].self_attn.q_proj.bits == 8


def test_prune_after_quantize_skips_the_quantized_layers_and_reports_them(tiny_model):
    model = tiny_model("llama")
    compress.apply(model, [quantize(method="rtn", group_size=32, targets=["re:.*mlp\\..*"])], progress=False)
    _, report = compress.apply(model, [compress.get_pass("prune")(method="magnitude", structure="2:4")],
                               progress=False)
    pruned = report.passes[0]
    assert pruned.skipped and set(pruned.skipped.values()) == {"already quantized"}
    assert all(".mlp." in n for n in pruned.skipped) and not any(".mlp." in n for n in pruned.modules)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedLinear)  # left as it was
    assert pruned.to_dict()["skipped"] == pruned.skipped
    # and quantize after prune (bitsandbytes cannot hold packed weights) reports the same way
    model = tiny_model("llama")
    compress.apply(model, [compress.get_pass("prune")(method="magnitude", structure="2:4", storage="packed",
                                                        targets=["re:.*mlp\\..*"])], progress=False)
    _, report = compress.apply(model, [quantize(method="rtn", group_size=32, targets=["re:.*mlp\\..*"])],
                               progress=False)
    assert not report.passes[0].skipped  # gptq/rtn quantize pruned layers and keep them sparse


@pytest.mark.parametrize("structure, sparsity, storage, method, symmetric, saved", [
    ("2:4", None, "dense", "gptq", True, False), ("2:4", None, "dense", "gptq", True, True),
    ("2:4", None, "dense", "rtn", False, False),
    ("unstructured", 0.05, "auto", "gptq", True, True),  # (auto stores 5% sparse layers dense: packing saves nothing)
    ("unstructured", 0.5, "dense", "rtn", False, False)])
def test_a_pruned_layer_stored_dense_keeps_its_zeros_and_structure_when_quantized(structure, sparsity, storage,
                                                                                   method, symmetric, saved, tmp_path):
    """GPTQ read a pruned layer stored dense as a plain Linear: its updates filled 6% of the pruned weights, a 2:4
    layer lost its structure, and the checkpoint still recorded the pruning. N:M is stored packed as a packed
    layer's codes are; unstructured stays dense, its zeros codes of zero (no bitmask: it would save nothing)."""
    model, tokenizer = compress.load("builtin:tiny", dtype="float32"), compress.load_tokenizer("builtin:tiny")
    prune = compress.get_pass("prune")(method="magnitude", structure=structure, storage=storage,
                                       **({"sparsity": sparsity} if sparsity else {}))
    compress.apply(model, [prune], progress=False)
    pruned = {n: m.weight == 0 for n, m in model.named_modules() if n.endswith("_proj")}
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in pruned)
    if saved:  # the next run reads the marks from the checkpoint's record
        compress.save(model, tmp_path / "pruned", tokenizer=tokenizer)
        model = compress.load(tmp_path / "pruned", dtype="float32")
    calibration = {"source": "builtin:calibration", "num_samples": 8, "seq_len": 64}
    _, report = compress.apply(model, [quantize(method=method, group_size=64, symmetric=symmetric)],
                               calibration=calibration, tokenizer=tokenizer, progress=False)
    nm = structure == "2:4"
    assert report.passes[0].details["pruned_layers_kept_sparse"] == (len(pruned) if nm else 0)
    for name, zeros in pruned.items():
        layer = model.get_submodule(name)
        weight = layer.dequantized_weight(torch.float32)
        assert not weight[zeros].any(), name
        assert (layer.sparsity, layer.sparsity_structure) == (("nm", (2, 4)) if nm else (None, None))

"""bitsandbytes methods: our layers equal bitsandbytes' own (quantized tensors and forward, bit for bit), and a
checkpoint of them loads in plain transformers (a process that never imports compress) with the same logits.

Tolerance of the transformers comparison: exact (0) once transformers' unquantized tensors are cast to float32;
transformers 5 keeps a bitsandbytes checkpoint's unquantized tensors (embeddings, norms, head) in the stored bf16
whatever `dtype` asks, so its own bf16 forward differs from compress.load's float32 one by about 0.05 in the logits
(also checked, as a bound)."""
from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys
import textwrap

import pytest
import torch

import compress
from compress.errors import CompressError
from compress.quantize.bnb import Bnb4bitLinear, Bnb8bitLinear

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_equals_bitsandbytes_bit_for_bit(quant_type, double_quant):
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 40, bias=True)
    ours = Bnb4bitLinear.from_linear(linear, quant_type=quant_type, blocksize=128, double_quant=double_quant,
                                     compute_dtype=torch.float32)
    packed, state = bnb.functional.quantize_4bit(linear.weight.detach(), blocksize=128,
                                                 compress_statistics=double_quant, quant_type=quant_type)
    assert torch.equal(ours.weight, packed) and torch.equal(ours.absmax, state.absmax)
    theirs = bnb.nn.Linear4bit(192, 40, bias=True, compute_dtype=torch.float32, compress_statistics=double_quant,
                               quant_type=quant_type)
    theirs.load_state_dict(linear.state_dict())
    theirs.weight.blocksize = 128
    theirs = theirs.to("cpu")  # bitsandbytes quantizes on the move
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    x = torch.randn(2, 7, 192)
    assert torch.equal(ours(x), theirs(x))
    # and back from the state dict alone (what compress.load does)
    empty = Bnb4bitLinear(192, 40, quant_type=quant_type, blocksize=128, double_quant=double_quant,
                          compute_dtype=torch.float32, state_bytes=ours.quant_state.numel(), bias=True)
    empty.load_state_dict(ref)
    assert torch.equal(empty(x), theirs(x))


def test_int8_equals_bitsandbytes_with_outliers():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=True)
    ours = Bnb8bitLinear.from_linear(linear, threshold=6.0).eval()
    theirs = bnb.nn.Linear8bitLt(96, 40, bias=True, has_fp16_weights=False, threshold=6.0)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu").eval()
    assert torch.equal(ours.weight, theirs.weight.data)
    x = torch.randn(2, 5, 96)
    x[0, 0, 3] = 20.0  # an outlier column: the 16-bit path of LLM.int8
    assert torch.equal(ours(x), theirs(x))
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_missing_bitsandbytes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(CompressError, match=r"pip install 'compress\[bnb\]'"):
        compress.apply(compress.load("builtin:tiny"), [compress.get_pass("quantize")(method="nf4")], progress=False)


PLAIN = textwrap.dedent('''
    import json, sys, warnings, torch
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM
    out = {}
    for folder in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
        ids = torch.arange(3, 67).unsqueeze(0)
        with torch.no_grad():
            bf16 = model(ids).logits[0]
            for p in model.parameters():  # unquantized tensors stay bf16 in transformers: compare in float32
                if p.dtype == torch.bfloat16:
                    p.data = p.data.float()
            fp32 = model(ids).logits[0]
        out[folder] = {"layer": type(model.model.layers[0].mlp.down_proj).__name__,
                       "fp32": fp32.tolist(), "bf16": bf16.float().tolist()}
    assert "compress" not in sys.modules
    print(json.dumps(out))
''')


def test_checkpoint_loads_in_plain_transformers_with_the_same_logits(tmp_path):
    folders, expected = [], {}
    for method in ("nf4", "int8"):
        model = compress.load("builtin:tiny")
        compress.apply(model, [compress.get_pass("quantize")(method=method)], progress=False)
        folder = str(compress.save(model, tmp_path / method))
        config = json.loads((tmp_path / method / "config.json").read_text())
        assert config["model_type"] == "llama" and config["quantization_config"]["quant_method"] == "bitsandbytes"
        reloaded = compress.load(folder)
        with torch.no_grad():
            expected[folder] = model(torch.arange(3, 67).unsqueeze(0)).logits[0]
            # not bit for bit: oneDNN's fp32 kernels may sum in another order for differently aligned (mmapped)
            # tensors, and LLM.int8 re-rounds activations, so the last bits can move; 1e-3 of logits of ~15 cannot
            # hide a wrong weight
            torch.testing.assert_close(reloaded(torch.arange(3, 67).unsqueeze(0)).logits[0], expected[folder],
                                       rtol=0, atol=1e-3)
        folders.append(folder)
    run = subprocess.run([sys.executable, "-c", PLAIN, *folders], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    # On AVX512-BF16 CPUs bitsandbytes' own Linear4bit repacks its weight for a bf16 CPU kernel at the first eval
    # forward (absmax rounded to bf16), so there the 4-bit logits match to bf16 rounding instead of bit for bit.
    from bitsandbytes.functional import has_avx512bf16

    repacked = has_avx512bf16()
    for folder, layer in zip(folders, ("Linear4bit", "Linear8bitLt")):
        assert got[folder]["layer"] == layer
        atol = 0.05 if repacked and layer == "Linear4bit" else 1e-3
        torch.testing.assert_close(torch.tensor(got[folder]["fp32"]), expected[folder], rtol=0, atol=atol)
        assert (torch.tensor(got[folder]["bf16"]) - expected[folder]).abs().max() < 0.25


def test_a_blocksize_that_does_not_divide_a_width_is_said(tiny_model):
    """bnb_blocksize 128 on builtin:tiny's down_proj (704 wide): plain transformers' bitsandbytes CPU kernels fail
    on such a layer at its first forward (a helper's run), so the report says so and names a size that fits."""
    pytest.importorskip("bitsandbytes")
    model = compress.load("builtin:tiny")
    _, report = compress.apply(model, [compress.get_pass("quantize")(method="nf4", bnb_blocksize=128)],
                               progress=False)
    note = " ".join(report.passes[0].notes)
    assert "bnb_blocksize 128 does not divide the input width of 6 layer(s) (model.layers.0.mlp.down_proj: 704)" \
        in note and "bnb_blocksize 64 divides every width" in note
    _, report = compress.apply(compress.load("builtin:tiny"), [compress.get_pass("quantize")(method="nf4")],
                               progress=False)
    assert not report.passes[0].notes


def test_4bit_and_8bit_in_one_model_are_refused_before_any_work():
    """transformers builds every bitsandbytes layer from the one quantization_config: nf4 MLPs then int8 attention
    loaded the MLPs as 8-bit layers (their quant state unexpected, the forward broken). Both kinds of 4-bit mix."""
    quantize = compress.get_pass("quantize")
    mlp, attn = ["re:.*mlp.*"], ["re:.*self_attn.*"]
    for first, second in (("nf4", "int8"), ("int8", "fp4")):
        with pytest.raises(CompressError, match="transformers loads one bitsandbytes kind per model"):
            compress.apply(compress.load("builtin:tiny"), [
                quantize(method=first, targets=mlp, **({"bnb_blocksize": 64} if first != "int8" else {})),
                quantize(method=second, targets=attn, **({"bnb_blocksize": 64} if second != "int8" else {}))],
                progress=False)
    model, _ = compress.apply(compress.load("builtin:tiny"), [quantize(method="nf4", bnb_blocksize=64, targets=mlp)],
                              progress=False)
    with pytest.raises(CompressError, match="already has 4-bit bitsandbytes layers"):  # a loaded checkpoint's too
        compress.apply(model, [quantize(method="int8", targets=attn)], progress=False)
    compress.apply(model, [quantize(method="fp4", bnb_blocksize=64, targets=attn)], progress=False)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_inspect_counts_the_float32_state_at_its_stored_size(tmp_path, method):
    """The scales bitsandbytes keeps float32 (int8's SCB; nf4's absmax, quant_map, nested state) were counted at the
    checkpoint's bf16: inspect's total fell short of the tensors in the file by their half."""
    pytest.importorskip("bitsandbytes")
    from safetensors import safe_open

    from compress.cli_inspect import inspect_checkpoint

    model, _ = compress.apply(compress.load("builtin:tiny", dtype="stored"),
                              [compress.get_pass("quantize")(method=method)], progress=False)
    folder = compress.save(model, tmp_path / method)
    stored = 0
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            stored += sum(st.get_tensor(k).nbytes for k in st.keys())
    components = inspect_checkpoint(str(folder), "auto", "cpu")["components"]
    counted = sum(v["dense"] + v["compressed"] for v in components.values())
    assert counted == stored


def test_a_folder_quantized_by_transformers_is_refused_as_a_recipes_model(tmp_path):
    """transformers' own bitsandbytes layers (not compress's): a recipe on them wrote a checkpoint whose tensors did
    not match its config; refused with one line. compress's own 4-bit checkpoint takes a recipe (gear_kv)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from compress.api import check_not_quantized_elsewhere
    from compress.models import resolve_model_path

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny"), quantization_config=config).save_pretrained(
        tmp_path / "hf")
    with pytest.raises(CompressError, match="holds layers quantized by bitsandbytes: .* to the original model"):
        compress.apply(compress.load(tmp_path / "hf"), [compress.get_pass("gear_kv")(bits=4)], progress=False)
    # compress inspect reads it as eval and generate do (it refused its double-quant tensors), counting the headers
    from click.testing import CliRunner

    from compress.cli import main

    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "hf"), "--json"])
    assert shown.exit_code == 0, shown.output
    assert 0 < json.loads(shown.stdout)["budget"]["weights_total"]["stored"] < 14e6  # 4-bit layers, bf16 the rest
    ours = compress.load("builtin:tiny")
    compress.apply(ours, [compress.get_pass("quantize")(method="nf4")], progress=False)
    reloaded = compress.load(compress.save(ours, tmp_path / "ours"))
    check_not_quantized_elsewhere(reloaded)
    compress.apply(reloaded, [compress.get_pass("gear_kv")(bits=4)], progress=False)
    # inspect: transformers' folder from its headers, compress's own through its modules
    from compress.cli_inspect import _quantized_by_transformers
    from compress.models import compression_section

    assert _quantized_by_transformers(tmp_path / "hf", compression_section(tmp_path / "hf") or {})
    assert not _quantized_by_transformers(tmp_path / "ours", compression_section(tmp_path / "ours"))


def test_4bit_checkpoint_with_layers_left_on_disk_is_refused(tmp_path):
    """A bitsandbytes 4-bit layer's quant state cannot sit behind accelerate's offload hooks: one clear error, and a
    cap the model fits in still loads."""
    from compress.errors import CheckpointError

    model = compress.load("builtin:tiny")
    compress.apply(model, [compress.get_pass("quantize")(method="nf4")], progress=False)
    folder = compress.save(model, tmp_path / "nf4")
    with pytest.raises(CheckpointError, match="bitsandbytes 4-bit layers, which max_memory loading cannot leave"):
        compress.load(folder, max_memory="6MB")
    assert compress.load(folder, max_memory="1GB").compress_offloaded_layers == []
    # 4-bit layers that stay in memory are fine while other layers go to disk
    model = compress.load("builtin:tiny")
    compress.apply(model, [compress.get_pass("quantize")(method="nf4", targets=["re:.*layers\\.0\\..*proj"])],
                   progress=False)
    folder = compress.save(model, tmp_path / "nf4-layer0")
    capped = compress.load(folder, max_memory=24_000_000)  # head, embeddings and layers 0-1 at fp32
    assert capped.compress_offloaded_layers and 0 not in capped.compress_offloaded_layers
    ids = torch.randint(0, 8192, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(capped(ids).logits, compress.load(folder)(ids).logits, rtol=0, atol=0)


def test_a_damaged_quant_state_is_one_line_at_load(tmp_path):
    """A 4-bit layer's quant state (bitsandbytes' packed JSON) overwritten: it loaded, then every forward ended in a
    JSON traceback; now the load names the tensor."""
    from safetensors.torch import load_file, save_file

    from compress.errors import CheckpointError

    model = compress.load("builtin:tiny")
    compress.apply(model, [compress.get_pass("quantize")(method="nf4")], progress=False)
    folder = compress.save(model, tmp_path / "nf4")
    state = load_file(folder / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    state[key] = torch.full_like(state[key], 65)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{key}: not a bitsandbytes quant state"):
        compress.load(folder)


def test_int8_layers_do_not_log_at_every_call(caplog):
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" at every call of every layer."""
    import logging

    model = compress.load("builtin:tiny")
    compress.apply(model, [compress.get_pass("quantize")(method="int8")], progress=False)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(torch.arange(3, 20).unsqueeze(0))
    assert "MatMul8bitLt" not in caplog.text


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_a_cast_keeps_the_quantization_state_in_float32(method, tmp_path):
    """`model.to(torch.bfloat16)` / `.half()` cast bitsandbytes' float32 state with the rest: NF4 with double
    quantization then dequantized weights to ~1e30 and gave NaN logits, silently; LLM.int8 refused its bf16 row
    scales (an audit's finds). The state stays float32, so a cast model computes as one loaded in that dtype."""
    model, _ = compress.apply(compress.load("builtin:tiny", dtype="float32"),
                              [compress.get_pass("quantize")(method=method)], progress=False)
    folder = compress.save(model, tmp_path / method)
    ids = torch.randint(0, 8000, (1, 12), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.bfloat16, torch.float16):
        cast = compress.load(folder, dtype="float32").to(dtype)
        loaded = compress.load(folder, dtype=str(dtype).removeprefix("torch."))
        states = [b for m in cast.modules() if isinstance(m, (Bnb4bitLinear, Bnb8bitLinear))
                  for n, b in m.named_buffers(recurse=False) if n in ("absmax", "quant_map", "nested_absmax",
                                                                       "nested_quant_map", "SCB")]
        assert states and all(b.dtype in (torch.float32, torch.uint8) for b in states)
        with torch.no_grad():
            ours, reference = cast(ids).logits, loaded(ids).logits
        assert torch.isfinite(ours).all()
        # (`.to()` also casts the rotary inv_freq, which a load in that dtype keeps float32: the plain model's own
        # gap is 0.06 in bf16, 0.008 in fp16, which LLM.int8's outlier threshold amplifies to ~0.07 in fp16)
        torch.testing.assert_close(ours, reference, rtol=0, atol=0.15)
    half = compress.load(folder, dtype="float32").half().float()  # and back: the state never rounded
    with torch.no_grad():
        torch.testing.assert_close(half(ids).logits, compress.load(folder, dtype="float32")(ids).logits, rtol=0,
                                   atol=0.1)

"""Damaged or hand-edited checkpoints: every command that reads one (compress.load, eval, generate, inspect, apply)
ends with one clear CheckpointError line and exit 2, never a library traceback, and apply writes nothing."""
from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import compress
from compress.errors import CheckpointError

WEIGHTS = "model.safetensors"


def _rewrite(folder, fn):
    state = load_file(folder / WEIGHTS)
    fn(state)
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})


def _config(folder, fn):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    fn(config)
    path.write_text(json.dumps(config))


def _truncate(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _random(folder):
    size = (folder / WEIGHTS).stat().st_size
    (folder / WEIGHTS).write_bytes(os.urandom(size))


def _bad_header(folder):
    data = (folder / WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    (folder / WEIGHTS).write_bytes(data[:8] + b"{" * length + data[8 + length:])


def _huge_header(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 2**40) + data[8:])


def _lying_dtype(folder):
    """The header names a dtype of another width than the bytes stored (same-length name: the header keeps its size)."""
    data = (folder / WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + length]
    swapped = header.replace(b'"F32"', b'"F64"', 1) if b'"F32"' in header else header.replace(b'"BF16"', b'"BOOL"', 1)
    (folder / WEIGHTS).write_bytes(data[:8] + swapped + data[8 + length:])


def _empty(folder):
    (folder / WEIGHTS).write_bytes(b"")


def _truncated_config(folder):
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])


def _extra_bitmask_bit(folder):
    def damage(state):
        key = next(k for k in state if k.endswith(".bitmask"))
        row = state[key][0]
        zero_bit = next(i for i in range(row.numel() * 8) if not (int(row[i // 8]) >> (i % 8)) & 1)
        row[zero_bit // 8] |= 1 << (zero_bit % 8)
    _rewrite(folder, damage)


def _repeated_nm_position(folder):
    def damage(state):
        key = next(k for k in state if k.endswith(".indices"))
        state[key][0, 0] = 0  # 2:4, 2 bits per position: both kept values of the first group at position 0
    _rewrite(folder, damage)


def _vq_code_out_of_range(folder):
    def damage(state):
        state["lm_head.codes"][0] = 200
    _rewrite(folder, damage)


def _float_bitmask(folder):
    def damage(state):
        key = next(k for k in state if k.endswith(".bitmask"))
        state[key] = state[key].float()
    _rewrite(folder, damage)


def _edit_header(folder, fn):
    """Edit the header's JSON in place (padded to the same length: the data section stays where it was)."""
    data = (folder / WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    fn(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    (folder / WEIGHTS).write_bytes(data[:8] + text + b" " * (length - len(text)) + data[8 + length:])


def test_a_plain_folder_with_integers_for_floats_is_refused(tmp_path, tiny_model, save_hf_folder):
    """transformers casts an int16 norm weight to the model's dtype without a word (a helper's find)."""
    folder = save_hf_folder(tiny_model("llama"), tmp_path / "hf")
    state = load_file(folder / WEIGHTS)
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int16)
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="wrong dtypes: model.norm.weight: stored I16 vs model float32"):
        compress.load(folder)


def _overlapping_tensors(folder):
    """Two tensors' data offsets point at the same bytes (each entry's size still matches its shape)."""
    data = (folder / WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first, second = header[names[0]], header[names[1]]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]  # starts where the first does
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (length - len(text))  # same header length: the data section stays where it was
    assert len(text) == length
    (folder / WEIGHTS).write_bytes(data[:8] + text + data[8 + length:])


CASES = {
    # name: (checkpoint, damage, message fragment)
    "truncated": ("bitmask", _truncate, "is truncated"),
    "random bytes": ("bitmask", _random, "damaged"),
    "header not JSON": ("bitmask", _bad_header, "header that is not JSON"),
    "oversized header": ("bitmask", _huge_header, "-byte header"),
    "header lies about a dtype": ("bitmask", _lying_dtype, "bytes stored for shape"),
    "empty weights": ("bitmask", _empty, "is empty (0 bytes)"),
    "overlapping tensors": ("bitmask", _overlapping_tensors, "overlap in the data section"),
    # the safetensors reader refuses both with its own error class (a traceback from a plain folder)
    "trailing bytes": ("bitmask", lambda f: open(f / WEIGHTS, "ab").write(b"\0" * 64),
                       "holds 64 bytes that no tensor covers"),
    "__metadata__ not strings": ("bitmask", lambda f: _edit_header(f, lambda h: h.update(__metadata__={"format": 1})),
                                 "__metadata__ entry that is not a mapping of strings"),
    "truncated config.json": ("bitmask", _truncated_config, "config.json: not valid JSON at line"),
    "compression is a string": ("bitmask", lambda f: _config(f, lambda c: c.update(compression="yes")),
                                "the `compression` section is a str, not a mapping"),
    "compression is a list": ("bitmask", lambda f: _config(f, lambda c: c.update(compression=[1])),
                              "the `compression` section is a list"),
    "passes is a string": ("bitmask", lambda f: _config(f, lambda c: c["compression"].update(passes="prune")),
                           "`compression.passes` is a str"),
    "restore is a list": ("bitmask", lambda f: _config(f, lambda c: c["compression"]["passes"][0].update(restore=[1])),
                          "`compression.passes[0].restore` is a list"),
    "unknown sparse format": ("bitmask", lambda f: _config(f, lambda c: [s.update(format="csr") for s in
                                                                         c["compression"]["passes"][0]["restore"].values()]),
                              "damaged restore record"),
    "bitmask keeps more than stored": ("bitmask", _extra_bitmask_bit, "its bitmask keeps"),
    "bitmask stored as floats": ("bitmask", _float_bitmask, "wrong dtypes"),
    "N:M positions repeat": ("nm", _repeated_nm_position, "positions repeat"),
    # a quantized layer pruned first keeps its positions too (they were not checked: generate printed garbage)
    "quantized N:M positions repeat": ("nm_int4", _repeated_nm_position, "positions repeat"),
    "VQ code out of range": ("vq", _vq_code_out_of_range, "code is outside the 16 codebook rows"),
    # transformers' reason is on the second line of its message: kept (the first only announces it)
    "source_model is a number": ("bitmask", lambda f: _config(f, lambda c: c["compression"].update(source_model=5)),
                                 "`compression.source_model` is an int, not a string"),
    "calibration sketch edited": ("bitmask", lambda f: _config(f, lambda c: c["compression"].update(
        calibration_sketch={"ngram": 16, "modulus": 100, "hashes": ["zz"]})), "`compression.calibration_sketch`"),
    "heads do not divide the width": ("bitmask", lambda f: _config(f, lambda c: c.update(num_attention_heads=3)),
                                      "is not a multiple of the number of attention heads (3)"),
    # a copy kept beside the weights: the message names both files (it blamed the weights as "damaged")
    "backup beside the weights": ("bitmask", lambda f: shutil.copy(f / WEIGHTS, f / "model.backup.safetensors"),
                                  "is in both model.backup.safetensors and model.safetensors"),
}
# damage that only the tensors' contents show: inspect reads headers only, so it cannot see these
CONTENT_ONLY = {"bitmask keeps more than stored", "N:M positions repeat", "VQ code out of range",
                "quantized N:M positions repeat"}


@pytest.fixture(params=list(CASES), name="damaged")
def damaged_checkpoint(request, packed_checkpoints, copy_of):
    kind, damage, message = CASES[request.param]
    folder = copy_of(packed_checkpoints[kind])
    damage(folder)
    return request.param, folder, message


def test_compress_load_raises_one_line(damaged):
    _, folder, message = damaged
    with pytest.raises(CheckpointError, match=None) as info:
        compress.load(folder)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1


def test_compress_load_with_layers_left_on_disk_raises_the_same_line(damaged):
    """max_memory loading skipped the checks (a helper's find): tracebacks, or a damaged model that ran."""
    _, folder, message = damaged
    with pytest.raises(CheckpointError, match=None) as info:
        compress.load(folder, max_memory="1MB")
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1


def test_every_command_exits_2(damaged, cli, user_error, tmp_path):
    name, folder, message = damaged
    user_error(cli("eval", folder, "--no-speed", "--max-windows", 1), message)
    user_error(cli("generate", folder, "--prompt", "hi", "--max-new-tokens", 1), message)
    if name not in CONTENT_ONLY:
        user_error(cli("inspect", folder), message)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - prune: {sparsity: 0.5}\n")
    user_error(cli("apply", recipe, "--model", folder, "--output", tmp_path / "out", "--no-eval"), message)
    assert not (tmp_path / "out").exists()


def test_broken_shard_index(packed_checkpoints, copy_of, cli, user_error):
    folder = copy_of(packed_checkpoints["bitmask"])
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../etc/passwd"}}')
    with pytest.raises(CheckpointError, match="not a valid index"):
        compress.load(folder)
    user_error(cli("inspect", folder), "not a valid index")


def test_intact_checkpoints_still_load_exactly(packed_checkpoints):
    """The checks reject nothing valid: each packed checkpoint reloads and runs."""
    ids = torch.randint(0, 8192, (1, 8))
    for folder in packed_checkpoints.values():
        model = compress.load(folder)
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()


EDITED_CONFIGS = {
    # hand edits that transformers or a pass's restore would otherwise end in a traceback
    "negative nnz in a restore record": (lambda c: [s.update(nnz=-1) for s in
                                                    c["compression"]["passes"][0]["restore"].values()],
                                         "damaged restore record"),
    # allocated from the record before the files were compared: an out-of-memory traceback (a helper's find)
    "a huge nnz in a restore record": (lambda c: [s.update(nnz=10**12) for s in
                                                  c["compression"]["passes"][0]["restore"].values()],
                                       "vs model (1000000000000,)"),
    "heads that do not divide the hidden size": (lambda c: c.update(num_attention_heads=3),
                                                 "transformers cannot read it"),
    "dtype that is no floating-point type": (lambda c: c.update(dtype="int7"), "int7"),
    "negative context": (lambda c: c.update(max_position_embeddings=-1), "max_position_embeddings is -1"),
    "adapter folder that is no name": (lambda c: c["compression"]["passes"].append(
        {"pass": "recover", "args": {}, "restore": {"adapter": 5, "modules": []}}),
        "restore.adapter must name a folder inside the checkpoint"),
    "dense-pruned layers that are no names": (lambda c: c["compression"]["passes"][0].update(dense_pruned=[3]),
                                              "`dense_pruned` is not a list of module names"),
    # values transformers' config class accepts and its modeling code cannot use (KeyError / ZeroDivisionError)
    "unknown activation": (lambda c: c.update(hidden_act="swishy"), "transformers cannot build a llama model"),
    "no key/value heads": (lambda c: c.update(num_key_value_heads=0), "transformers cannot build a llama model"),
    "unknown RoPE type": (lambda c: c.update(rope_parameters={**(c.get("rope_parameters") or {}),
                                                              "rope_type": "yarnz"}),
                          "transformers cannot build a llama model"),
    "an N:M record without N and M": (lambda c: [s.update(format="nm") for s in
                                                 c["compression"]["passes"][0]["restore"].values()],
                                      "damaged restore record"),
    # said "written by format version 1; this library reads up to version 1: upgrade compress"
    "format version as a string": (lambda c: c["compression"].update(format_version="1"),
                                   "compression.format_version is '1', not an integer"),
    "a negative format version": (lambda c: c["compression"].update(format_version=-1),
                                  "compression.format_version is -1, not an integer >= 0"),
    # transformers' traceback about the marked model type (an audit's find); inspect blamed the tensors
    "no compression section": (lambda c: c.pop("compression"),
                               "a compress checkpoint whose `compression` entry is missing (edited?)"),
    "a null compression section": (lambda c: c.update(compression=None), "`compression` entry is missing"),
    "no real model type": (lambda c: c.pop("compress_model_type"), "`compress_model_type` entry is missing"),
}


def test_quantize_arguments_edited_against_the_layers_exit_2(packed_checkpoints, copy_of, cli, user_error):
    """The layers load from their own records; inspect printed the entry's edited `bits` as if it were stored (an
    audit's find): the two disagreeing is a damaged checkpoint."""
    folder = copy_of(packed_checkpoints["int4"])
    _config(folder, lambda c: c["compression"]["passes"][0]["args"].update(bits=8))
    message = "the quantize entry (bits 8, group_size 32, symmetric True) disagrees with model.layers.0"
    user_error(cli("inspect", folder), message, "record (bits 4, group_size 32, symmetric True)")
    user_error(cli("generate", folder, "--prompt", "hi", "--max-new-tokens", 1), message)


@pytest.mark.parametrize("name", list(EDITED_CONFIGS))
def test_edited_config_exits_2(name, packed_checkpoints, copy_of, cli, user_error):
    edit, message = EDITED_CONFIGS[name]
    folder = copy_of(packed_checkpoints["bitmask"])
    _config(folder, edit)
    user_error(cli("inspect", folder), message)
    user_error(cli("generate", folder, "--prompt", "hi", "--max-new-tokens", 1), message)


def test_checkpoint_without_tokenizer_is_one_line(packed_checkpoints, copy_of):
    """In a real process (transformers' logging writes to the process's stderr, which CliRunner does not capture):
    no tokenizer files is one error line, without transformers' warning about the marked config.json."""
    import subprocess
    import sys

    folder = copy_of(packed_checkpoints["bitmask"])
    code = "from compress.cli import main; main()"
    # with its tokenizer, a packed checkpoint generates without transformers' warning about the marked config.json
    ok = subprocess.run([sys.executable, "-c", code, "generate", str(folder), "--prompt", "hi", "--max-new-tokens",
                         "1"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "compress-native" not in ok.stderr, ok.stderr
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    run = subprocess.run([sys.executable, "-c", code, "generate", str(folder), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=120)
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1 and "has no tokenizer files" in lines[0], lines


def test_damaged_tokenizer_blocks_only_what_needs_text(tmp_path, small_model, tokenizer, cli, user_error):
    """Unreadable tokenizer files: an error where text is needed (eval), none where it is not (magnitude pruning
    without evaluation), in the API and the CLI."""
    folder = compress.save(small_model(), tmp_path / "m", tokenizer=tokenizer)
    (folder / "tokenizer.json").write_text('{"broken')
    with pytest.raises(CheckpointError, match="its tokenizer files cannot be read"):
        compress.load_tokenizer(folder)
    compress.apply(compress.load(folder), [compress.passes.Prune(sparsity=0.5)], progress=False)
    user_error(cli("eval", folder, "--no-speed", "--max-windows", 1), "its tokenizer files cannot be read")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - prune: {sparsity: 0.5}\n")
    result = cli("apply", recipe, "--model", folder, "--output", tmp_path / "out", "--no-eval", "--json")
    assert result.exit_code == 0, result.output


def _drop_layer_1(folder):
    state = {k: v for k, v in load_file(folder / "model.safetensors").items() if not k.startswith("model.layers.1.")}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


PLAIN_CASES = {  # a plain Hugging Face folder (no compression section) whose tensors contradict its config
    "missing layer": (_drop_layer_1, "missing tensors: model.layers.1."),
    "other shapes": (lambda f: _config(f, lambda c: c.update(intermediate_size=100)), "stored tensors of other shapes"),
    "extra layer": (lambda f: _config(f, lambda c: c.update(num_hidden_layers=1)), "unexpected tensors: model.layers.1."),
}


@pytest.mark.parametrize("case", list(PLAIN_CASES))
def test_plain_folder_that_contradicts_its_config_is_refused(case, small_model, tokenizer, tmp_path, cli, user_error):
    """transformers fills missing tensors with random values (and drops unexpected ones) with only a warning: apply
    would compress, and generate and eval run, a model that is not the checkpoint. Every command refuses it."""
    damage, message = PLAIN_CASES[case]
    folder = tmp_path / "plain"
    small_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    damage(folder)
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        compress.load(folder)
    user_error(cli("generate", folder, "--prompt", "hi", "--max-new-tokens", 1), message)
    user_error(cli("eval", folder, "--no-speed", "--max-windows", 1), message)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - prune: {sparsity: 0.5}\n")
    user_error(cli("apply", recipe, "--model", folder, "--output", tmp_path / "out", "--no-eval"), message)
    assert not (tmp_path / "out").exists()


def test_a_config_nested_too_deeply_is_one_line(packed_checkpoints, copy_of, cli, user_error):
    folder = copy_of(packed_checkpoints["bitmask"])
    (folder / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    for command in (("inspect", folder), ("eval", folder, "--no-speed")):
        user_error(cli(*command), "config.json: nested too deeply to read")


def test_a_model_with_nan_weights_gives_strict_json_and_a_warning(tmp_path, small_model, tokenizer, cli):
    """`eval --json` printed bare NaN (not JSON: strict parsers reject it) with exit 0, and the table 'nan' with no
    word of why. Non-finite numbers are null now, and a warning says what the NaN means."""
    import json

    model = small_model()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    tokenizer.save_pretrained(tmp_path / "nan")
    result = cli("eval", tmp_path / "nan", "--max-windows", "2", "--seq-len", "64", "--no-speed", "--json",
                 "--baseline", tmp_path / "base")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert out["perplexity"] is None and "logits hold NaN or inf" in out["warning"]
    assert out["kl"] is None and out["top1_agreement"] is None  # (it said 0.0: argmax of NaN logits)
    assert "warning: the model's logits hold NaN or inf" in result.stderr
    with torch.no_grad():  # finite logits, a mean NLL past e**709: the perplexity overflowed (OverflowError)
        model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 1e4)
    model.save_pretrained(tmp_path / "huge")
    tokenizer.save_pretrained(tmp_path / "huge")
    result = cli("eval", tmp_path / "huge", "--max-windows", "2", "--seq-len", "64", "--no-speed", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["perplexity"] is None and "perplexity overflows" in result.stderr


def test_nan_weights_are_refused_before_any_pass(tmp_path, small_model, tokenizer, cli, user_error):
    """A NaN weight went through every pass unseen (RTN mapped a NaN scale to 1 and zeroed the group; GPTQ zeroed
    rows) and the checkpoint written looked like any other; now apply names the tensor, and writes nothing."""
    model = small_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, :2] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    tokenizer.save_pretrained(tmp_path / "nan")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - quantize: {method: rtn, bits: 4, group_size: 32}\n")
    user_error(cli("apply", recipe, "--model", tmp_path / "nan", "--output", tmp_path / "out", "--no-eval"),
               "2 NaN or inf values in model.layers.1.mlp.up_proj.weight", "damaged")
    assert not (tmp_path / "out").exists()
    with pytest.raises(compress.CompressError, match="NaN or inf values in model.layers.1.mlp.up_proj.weight"):
        compress.apply(model, [compress.passes.Prune(method="magnitude", sparsity=0.5)], progress=False)


def test_a_bfloat16_checkpoint_loaded_as_float16_is_refused_where_it_overflows(tmp_path, small_model, tokenizer):
    """bfloat16 reaches 3e38, float16 65504: the cast turned large values into inf, which were then saved back."""
    model = small_model().to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = 1e5
    model.save_pretrained(tmp_path / "bf16")
    with pytest.raises(CheckpointError, match="bfloat16 weights as float16 leaves 1 NaN or inf value in "
                                              r"model.layers.0.self_attn.o_proj.weight .*--dtype"):
        compress.load(tmp_path / "bf16", dtype="float16")
    assert compress.load(tmp_path / "bf16", dtype="bfloat16").model.layers[0].self_attn.o_proj.weight[0, 0] == 1e5
    with torch.no_grad():  # a NaN is the checkpoint's own, not the cast's: loaded, and refused by apply as damage
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    loaded = compress.load(tmp_path / "nan", dtype="float16")
    with pytest.raises(compress.CompressError, match="1 NaN or inf value in .*o_proj.weight: the checkpoint is dama"):
        compress.apply(loaded, [compress.passes.Prune(method="magnitude", sparsity=0.5)], progress=False)


def test_the_finiteness_scan_counts_exactly_and_is_not_fooled_by_an_overflowing_sum(small_model):
    from compress.models import nonfinite_weights

    model = small_model()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e37)  # finite weights whose float32 sum overflows
        model.model.layers[1].self_attn.q_proj.weight[2, :5] = float("-inf")
        model.model.layers[1].self_attn.q_proj.weight[3, 0] = float("nan")
    assert nonfinite_weights(model) == [("model.layers.1.self_attn.q_proj.weight", 6, 1)]
    assert nonfinite_weights(model.to(torch.bfloat16)) == [("model.layers.1.self_attn.q_proj.weight", 6, 1)]

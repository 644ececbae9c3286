"""Checkpoints: atomic safetensors writes, exact round trip, refused pickle, version and tensor checks."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import compress
from compress import CheckpointError
from compress import checkpoint as ckpt



def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_round_trip_logits_identical(tmp_path, reference_model):
    ids = torch.randint(0, 8192, (2, 48), generator=torch.Generator().manual_seed(0))
    out = compress.save(reference_model, tmp_path / "ckpt", tokenizer=compress.load_tokenizer("builtin:tiny"))
    reloaded = compress.load(out)
    # the reference model is stored in bf16: saving writes the same bf16 values back, so logits match exactly
    assert torch.equal(_logits(reference_model, ids), _logits(reloaded, ids))
    config = json.loads((out / "config.json").read_text())
    assert config["compression"]["format_version"] == ckpt.FORMAT_VERSION
    assert config["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".ckpt.tmp-*"))


def test_sharded_round_trip(tmp_path, tiny_model):
    model = tiny_model("qwen2")
    model.compress_storage_dtype = torch.float32
    out = compress.save(model, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (out / ckpt.INDEX_NAME).exists() and len(list(out.glob("model-*.safetensors"))) > 2
    reloaded = compress.load(out)
    ids = torch.randint(0, 128, (1, 16))
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch, tiny_model):
    model = tiny_model("llama")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the user pressed Ctrl-C while weights were being written

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        compress.save(model, tmp_path / "target")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch, tiny_model):
    model = tiny_model("llama")
    target = compress.save(model, tmp_path / "target")
    before = (target / ckpt.WEIGHTS_NAME).read_bytes()
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        compress.save(model, target, overwrite=True)
    assert (target / ckpt.WEIGHTS_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


def test_existing_target_needs_overwrite(tmp_path, tiny_model):
    model = tiny_model("llama")
    compress.save(model, tmp_path / "t")
    with pytest.raises(CheckpointError, match="already exists"):
        compress.save(model, tmp_path / "t")


def test_pickle_is_refused_unless_allowed(tmp_path, tiny_model):
    model = tiny_model("llama")
    folder = tmp_path / "legacy"
    model.save_pretrained(folder, safe_serialization=False) if _supports_bin() else _write_bin(model, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="pickled .bin"):
        compress.load(folder)
    loaded = compress.load(folder, allow_pickle=True)
    ids = torch.randint(0, 128, (1, 8))
    assert torch.allclose(_logits(model, ids), _logits(loaded, ids))


def _supports_bin() -> bool:
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def _write_bin(model, folder):
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


def test_newer_format_version_is_refused(tmp_path, tiny_model):
    out = compress.save(tiny_model("llama"), tmp_path / "c")
    config = json.loads((out / "config.json").read_text())
    config["compression"]["format_version"] = ckpt.FORMAT_VERSION + 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format version 2.*upgrade compress"):
        compress.load(out)


@pytest.mark.parametrize("damage,message", [
    ("drop", "missing tensors: model.layers.0.mlp.up_proj.weight"),
    ("extra", "unexpected tensors: bogus.weight"),
    ("shape", "wrong shapes: model.layers.0.mlp.up_proj.weight"),
])
def test_tensor_mismatches_are_clear_errors(tmp_path, damage, message, tiny_model):
    from safetensors.torch import load_file, save_file

    out = compress.save(tiny_model("llama"), tmp_path / "c")
    state = load_file(out / ckpt.WEIGHTS_NAME)
    key = "model.layers.0.mlp.up_proj.weight"
    if damage == "drop":
        del state[key]
    elif damage == "extra":
        state["bogus.weight"] = torch.zeros(2)
    else:
        state[key] = state[key][:, :-1].contiguous()
    save_file(state, out / ckpt.WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        compress.load(out)


def test_integers_stored_wider_than_the_module_takes_are_refused(tmp_path, tiny_model):
    """Loading casts: a bitmask stored as int16 with 256 + its byte would wrap back into range past the packed-module
    checks (a helper's find, also for VQ codes, N:M positions and int4 codes)."""
    from safetensors.torch import load_file, save_file

    model, _ = compress.apply(tiny_model("llama"), [compress.passes.Prune(sparsity=0.5, storage="packed")],
                              progress=False)
    out = compress.save(model, tmp_path / "c")
    state = load_file(out / ckpt.WEIGHTS_NAME)
    key = "model.layers.0.mlp.up_proj.bitmask"
    assert state[key].dtype == torch.uint8
    state[key] = state[key].to(torch.int16) + 256
    save_file(state, out / ckpt.WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=f"wrong dtypes: {key}: checkpoint I16 vs model uint8"):
        compress.load(out)


def test_plain_hf_folder_and_missing_paths(tmp_path, tiny_model, save_hf_folder):
    folder = save_hf_folder(tiny_model("mistral"), tmp_path / "hf")
    model = compress.load(folder)
    assert type(model).__name__ == "MistralForCausalLM"
    with pytest.raises(CheckpointError, match="does not exist"):
        compress.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="unknown built-in model"):
        compress.load("builtin:huge")
    with pytest.raises(CheckpointError, match="config.json is a file; give the model's folder"):
        compress.load(folder / "config.json")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_config_without_dtype_reads_the_weights_dtype(tmp_path, tiny_model, save_hf_folder, dtype):
    """config.json naming no dtype: the stored tensors say it, as transformers reads them (a float32 folder was loaded
    and saved in bf16, silently, and apply counted the halving as compression: an audit's find)."""
    folder = save_hf_folder(tiny_model("llama").to(dtype), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    model = compress.load(folder, dtype="stored")
    assert model.model.layers[0].mlp.up_proj.weight.dtype == dtype
    saved = compress.save(model, tmp_path / "out")
    assert json.loads((saved / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")


def test_generation_config_travels_with_the_checkpoint(tmp_path, reference_model):
    """End-of-sequence ids and sampling defaults live in generation_config.json (Llama-3 Instruct stops at <|eot_id|>
    only through it): a compressed checkpoint keeps the source's, and both compress.load and transformers read it."""
    from transformers import AutoModelForCausalLM

    model, _ = compress.apply(copy.deepcopy(reference_model), [compress.passes.Prune(structure="2:4")],
                              progress=False)
    model.generation_config.eos_token_id = [0, 13]
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.6
    out = compress.save(model, tmp_path / "pruned")
    for loaded in (compress.load(out), compress.load(compress.save(compress.load(out), tmp_path / "again"))):
        config = loaded.generation_config
        assert (config.eos_token_id, config.do_sample, config.temperature) == ([0, 13], True, 0.6)
    dense = compress.save(copy.deepcopy(reference_model), tmp_path / "dense")
    (dense / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7], "bos_token_id": 0}))
    assert AutoModelForCausalLM.from_pretrained(dense).generation_config.eos_token_id == [0, 7]
    assert compress.load(dense).generation_config.eos_token_id == [0, 7]
    (out / "generation_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="generation_config.json: cannot be read"):
        compress.load(out)


@pytest.mark.parametrize("content,message", [
    ([], "cannot be read"), ({"eos_token_id": "x"}, "eos_token_id is 'x', not a token id"),
    ({"max_new_tokens": "a"}, "cannot be read"), ({"top_k": -3}, "top_k is -3, not a non-negative integer"),
    ({"temperature": "hot"}, "cannot be read|temperature is 'hot', not a number")])
def test_a_generation_config_generate_cannot_use_is_refused_on_load(tmp_path, tiny_model, save_hf_folder, content,
                                                                     message):
    """Hand-edited generation_config.json gave tracebacks in from_pretrained or later in generate (helper's find);
    a plain Hugging Face folder and a compressed checkpoint alike."""
    for folder in (save_hf_folder(tiny_model("llama"), tmp_path / "hf"), compress.save(tiny_model("llama"),
                                                                                         tmp_path / "c")):
        (folder / "generation_config.json").write_text(json.dumps(content))
        with pytest.raises(CheckpointError, match=f"generation_config.json: ({message})"):
            compress.load(folder)


@pytest.mark.parametrize("bad,message", [(0, "must be positive"), ("lots", "cannot read max_shard_bytes"),
                                         (True, "cannot read max_shard_bytes")])
def test_save_refuses_a_shard_size_it_cannot_use(tmp_path, tiny_model, bad, message):
    with pytest.raises(compress.CompressError, match=message):
        compress.save(tiny_model("llama"), tmp_path / "out", max_shard_bytes=bad)
    assert not (tmp_path / "out").exists()


def test_save_takes_a_shard_size_in_units(tmp_path, tiny_model):
    model = tiny_model("llama")
    out = compress.save(model, tmp_path / "out", max_shard_bytes="20KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    with pytest.raises(compress.CompressError, match="output folder as a path"):
        compress.save(model, None)


@pytest.mark.parametrize("passes", [
    lambda: [compress.passes.Prune(sparsity=0.5)],
    lambda: [compress.get_pass("linearize")(variant="hybrid", layers="every_2")],
], ids=["prune", "linearize"])
def test_save_pretrained_of_a_compressed_model_is_refused_by_plain_transformers(passes, tmp_path):
    """transformers' own save_pretrained wrote a folder plain transformers loaded without an error and with random
    layers (prune) or softmax attention (linearize): an audit's find. Its config.json is marked as compress.save
    marks it, for the model apply returned and one loaded; the rest is transformers' save as it was (into a folder
    holding other files, with state_dict=: a Trainer's checkpoints), and compress.load reads the folder."""
    import copy
    import gc
    import pickle
    import weakref

    from transformers import AutoModelForCausalLM

    model, _ = compress.apply(compress.load("builtin:tiny"), passes(), progress=False)
    ids = torch.randint(0, 8000, (1, 12), generator=torch.Generator().manual_seed(0))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "trainer_state.json").write_text("{}")  # another tool's file beside it: kept, as before
    model.save_pretrained(tmp_path / "a", state_dict=model.state_dict())
    assert (tmp_path / "a" / "trainer_state.json").exists()
    with pytest.raises(ValueError, match="load this checkpoint with compress.load"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    loaded = compress.load(tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="load this checkpoint with compress.load"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    twin = copy.deepcopy(model)
    assert twin.save_pretrained._model() is twin  # a copy saves the copy
    # a model holding it still pickles (nothing here unpickles): it reduces to its model, not to a weak reference
    assert loaded.save_pretrained.__reduce__() == (type(loaded.save_pretrained), (loaded,))
    if passes()[0].name == "linearize":  # (packed layers do not pickle, before this change too)
        pickle.dumps(loaded)
    with pytest.raises(compress.CompressError, match="push_to_hub=True"):
        model.save_pretrained(tmp_path / "c", push_to_hub=True)
    # a rank that writes nothing (another process's config.json there, or none) marks nothing and does not fail
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text('{"model_type": "llama"}')
    model.save_pretrained(tmp_path / "d", is_main_process=False)
    model.save_pretrained(tmp_path / "e", False)
    assert (tmp_path / "d" / "config.json").read_text() == '{"model_type": "llama"}'
    assert not (tmp_path / "e" / "config.json").exists()
    alive = weakref.ref(model)
    del model, twin
    gc.disable()  # no reference cycle: freed as soon as it is dropped
    try:
        assert alive() is None
    finally:
        gc.enable()


def test_resize_token_embeddings_refuses_a_compressed_head_before_changing_anything(tmp_path):
    """transformers resized the embeddings, then failed on a VQ head (no `.weight`): the model was left with 8200
    embedding rows and a head of 8192 outputs. Refused first now, on the model apply returns and on a loaded one;
    a model whose head and embeddings are dense resizes as before."""
    vq = compress.get_pass("vq_logits")(num_codes=64, scale_bias=False, weighting="uniform", fit_weighting="uniform")
    model, _ = compress.apply(compress.load("builtin:tiny"), [vq], progress=False)
    loaded = compress.load(compress.save(model, tmp_path / "vq"))
    for m in (model, loaded):
        with pytest.raises(compress.CompressError, match="output head is compressed .VQLogitsHead"):
            m.resize_token_embeddings(8200)
        assert m.get_input_embeddings().weight.shape[0] == 8192
    pruned, _ = compress.apply(compress.load("builtin:tiny"), [compress.passes.Prune(sparsity=0.5)], progress=False)
    pruned.resize_token_embeddings(8200, mean_resizing=False)
    assert pruned.get_output_embeddings().weight.shape[0] == 8200 == pruned.get_input_embeddings().weight.shape[0]


def test_overwrite_of_a_save_pretrained_folder_keeps_the_users_files(tmp_path):
    """save_pretrained wrote no manifest, so `--overwrite` took every checkpoint-like name in the folder for the
    tool's: a user's vocab.json and merges.txt put there went with the old checkpoint. The manifest lists what the
    save wrote; a user's file beside it stops the overwrite."""
    from compress.errors import OutputError
    from compress.output_folder import MANIFEST, check_output, written_files

    model, _ = compress.apply(compress.load("builtin:tiny"), [compress.passes.Prune(sparsity=0.5)], progress=False)
    folder = tmp_path / "sp"
    folder.mkdir()
    (folder / "notes.txt").write_text("before")  # there before the save: the user's
    model.save_pretrained(folder)
    listed = written_files(folder)
    assert {"config.json", "model.safetensors", MANIFEST} <= listed and "notes.txt" not in listed
    model.save_pretrained(folder)  # again: the same files, still listed
    assert written_files(folder) == listed
    (folder / "notes.txt").unlink()
    check_output(folder, overwrite=True)  # only what the save wrote: replaceable
    (folder / "vocab.json").write_text('{"mine": 1}')
    with pytest.raises(OutputError, match="tokenizer files saved beside the checkpoint after it was written"):
        check_output(folder, overwrite=True)  # (also the tokenizer.save_pretrained after the model's: it says so)
    assert (folder / "vocab.json").exists()


def test_an_adapter_saved_among_the_weights_is_named_at_load(tmp_path, reference_tokenizer):
    """save_pretrained of a model with an unmerged adapter writes the LoRA tensors among the weights, which
    compress.load refuses: the refusal says what they are and what writes them as adapter/."""
    recover = compress.get_pass("recover")(merge=False, max_tokens=256, seq_len=32)
    model, _ = compress.apply(compress.load("builtin:tiny"), [recover], progress=False, tokenizer=reference_tokenizer,
                              calibration={"source": "builtin:calibration", "num_samples": 4, "seq_len": 32})
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(compress.CompressError, match="a LoRA adapter saved among the weights by transformers' "
                                                     "save_pretrained: save the model with compress.save"):
        compress.load(tmp_path / "a")
    compress.save(model, tmp_path / "b")
    assert compress.load(tmp_path / "b") is not None


def test_saving_converts_each_tensor_when_its_shard_is_written(tmp_path):
    # converted up front, a float32 model saved in bf16 held a bf16 copy of itself (+14 GB at 7B) before the first
    # byte was written; now a shard's worth at most
    from compress.checkpoint import _unique_state_dict
    from compress.offload import LazyTensor

    model = compress.load("builtin:tiny", dtype="float32")
    state = _unique_state_dict(model, torch.bfloat16)
    floating = {k: v for k, v in state.items() if v.is_floating_point()}
    assert floating and all(isinstance(v, LazyTensor) and v.dtype == torch.bfloat16 for v in floating.values())
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(state[name].load(), model.get_submodule(name[:-len(".weight")]).weight.bfloat16())
    same = _unique_state_dict(model, torch.float32)  # nothing to convert: the tensors themselves, no copy
    assert same[name].data_ptr() == model.get_submodule(name[:-len(".weight")]).weight.data_ptr()


def test_a_folder_is_saved_back_at_the_dtype_its_files_hold(tmp_path):
    """A bf16 folder whose config.json says float32 was remembered as float32 and saved back at twice its size."""
    import json
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(compress.models.resolve_model_path("builtin:tiny"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config))
    model = compress.load(folder, dtype="float32")
    assert model.compress_storage_dtype == torch.bfloat16
    out = compress.save(model, tmp_path / "saved")
    assert (out / "model.safetensors").stat().st_size <= (folder / "model.safetensors").stat().st_size + 4096

"""The compressed-tensors export converts each layer as the writer reaches its shard (compress.checkpoint
write_weights takes (name, tensor) pairs): it never holds a converted copy of the whole model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import compress
import compress.checkpoint as checkpoint
import compress.export.compressed_tensors as ct

pytest.importorskip("compressed_tensors")


def pruned_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    model, _ = compress.apply(LlamaForCausalLM(config).eval(), [compress.get_pass("prune")(
        method="magnitude", structure="2:4")], progress=False)
    return model


def read_all(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def test_layers_are_converted_as_their_shards_are_written(tmp_path, monkeypatch):
    model, events = pruned_model(), []
    convert, save = ct._module_tensors, checkpoint.save_file
    monkeypatch.setattr(ct, "_module_tensors", lambda name, *a: events.append("convert") or convert(name, *a))
    monkeypatch.setattr(checkpoint, "save_file", lambda t, path, **kw: events.append("save") or save(t, path, **kw))
    summary = ct.export(model, tmp_path / "out", max_shard_bytes="40KB")
    assert events.count("convert") == 14 and events.count("save") > 3
    last_convert = len(events) - 1 - events[::-1].index("convert")
    assert events.index("save") < last_convert  # (the whole model converted before the first write: the old way)
    # what was written: every pruned layer dense with its zeros, the rest as the model holds it
    written = read_all(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(written)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    for name in summary.sparse:
        stored = written[f"{name}.weight"]
        assert torch.equal(stored, model.get_submodule(name).dense_weight(stored.dtype))
    embed = written["model.embed_tokens.weight"]
    assert torch.equal(embed, model.model.embed_tokens.weight.to(embed.dtype))
    assert summary.sparsity_structure == "2:4" and summary.global_sparsity == pytest.approx(0.5)


def test_pairs_and_a_dict_write_the_same_shards(tmp_path):
    state = {f"t{i}": torch.full((100 + i,), float(i)) for i in range(9)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    checkpoint.write_weights(state, tmp_path / "a", 1000)
    checkpoint.write_weights(iter(state.items()), tmp_path / "b", 1000)
    index_a = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert index_a == json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    assert sorted(set(index_a["weight_map"].values())) == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert not list((tmp_path / "b").glob("*.partial"))
    for name, t in read_all(tmp_path / "b").items():
        assert torch.equal(t, state[name])
    (tmp_path / "c").mkdir()
    checkpoint.write_weights(iter(state.items()), tmp_path / "c", 10**6)  # under the limit: one file, no index
    assert [f.name for f in (tmp_path / "c").iterdir()] == ["model.safetensors"]


def test_the_export_counts_the_layers_it_converts(tmp_path, monkeypatch):
    import io
    import sys

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    ct.export(pruned_model(), tmp_path / "out", progress=True)
    assert "exporting 14 compressed layers: 0/14" in err.getvalue()
    assert "exporting 14 compressed layers: 14/14" in err.getvalue()

"""The linearize pass: arguments validated, no weights changed, checkpoints reload (compress.load) and generate
what the converted model generated."""
from pathlib import Path

import pytest
import torch

import compress
from compress.errors import CompressError
from compress.linearize import LinearizedAttention

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_checkpoint_round_trip_and_generate(tmp_path, reference_tokenizer):
    model = compress.load("builtin:tiny")
    ids = torch.tensor([reference_tokenizer("The Python tutorial explains")["input_ids"]])
    lin = compress.get_pass("linearize")(variant="hybrid", window=16, layers="every_3")
    model, report = compress.apply(model, [lin], progress=False)
    assert report.bytes_before == report.bytes_after
    assert report.passes[0].modules == [f"model.layers.{i}.self_attn" for i in (0, 1, 3, 4)]
    reloaded = compress.load(compress.save(model, tmp_path / "out", tokenizer=reference_tokenizer))
    kinds = [type(layer.self_attn) is LinearizedAttention for layer in reloaded.model.layers]
    assert kinds == [True, True, False, True, True, False]
    assert reloaded.model.layers[0].self_attn.settings.window == 16
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        a = reloaded.generate(ids, max_new_tokens=8, do_sample=False)
        b = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("args,match", [
    (dict(layers="every_1"), "every_K needs K >= 2"),
    (dict(layers="some"), "layers must be"),
    (dict(window=1), "greater than or equal to 2"),
    (dict(variant="ssm"), "variant"),
    (dict(gate="gsa", normalize=True), "normalize applies to"),
    (dict(variant="mom", normalize=True), "normalize applies to"),
])
def test_bad_arguments(args, match):
    with pytest.raises(CompressError, match=match):
        compress.get_pass("linearize")(**args)


def test_layers_that_do_not_exist(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(CompressError, match=r"layers \[7\] do not exist"):
        compress.apply(model, [compress.get_pass("linearize")(layers=[0, 7])], progress=False)


@pytest.mark.parametrize("name", ["liger-gla", "liger-hybrid", "mom"])
def test_recipes_validate(name):
    recipe = compress.Recipe.from_yaml(RECIPES / f"{name}.yaml")
    passes = recipe.build_passes()
    assert [p.name for p in passes][0] == "linearize"

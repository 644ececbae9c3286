"""The quantization recipes validate and run end to end (calibration shrunk to keep the test fast), and each
checkpoint reloads through compress.load with exactly the in-memory model's logits."""
from pathlib import Path

import pytest
import torch

import compress
from compress.calibration import CalibrationSpec
from compress.quantize import QuantizedLinear
from compress.quantize.bnb import Bnb4bitLinear

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
IDS = torch.arange(3, 67).unsqueeze(0)


def _run(recipe_name, tmp_path, tokenizer):
    recipe = compress.Recipe.from_yaml(RECIPES / recipe_name)
    if recipe.calibration is not None:
        recipe.calibration = CalibrationSpec(source=recipe.calibration.source, num_samples=2, seq_len=64)
    model, report = compress.apply(compress.load(recipe.model), recipe, tokenizer=tokenizer, progress=False)
    reloaded = compress.load(compress.save(model, tmp_path / "out", recipe_text=recipe.text))
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
    return reloaded, report


@pytest.mark.parametrize("name,bits", [("w4-gptq.yaml", 4), ("w8-gptq.yaml", 8), ("w4-rtn.yaml", 4)])
def test_integer_recipes_run_and_reload(tmp_path, reference_tokenizer, name, bits):
    reloaded, report = _run(name, tmp_path, reference_tokenizer)
    layers = [m for m in reloaded.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 42 and {m.bits for m in layers} == {bits} and not any(m.sparsity for m in layers)
    # 704-wide down_proj: groups of 128 with a shorter last one
    assert {m.group_size for m in layers} == {128} and reloaded.model.layers[0].mlp.down_proj.scales().shape[1] == 6
    p = report.passes[0]
    assert p.bytes_after < p.bytes_before * (0.16 if bits == 4 else 0.3)  # vs fp32 in memory


def test_2of4_w4_recipe_stays_2of4(tmp_path, reference_tokenizer):
    reloaded, report = _run("2of4-w4.yaml", tmp_path, reference_tokenizer)
    assert report.passes[1].details["pruned_layers_kept_sparse"] == 42
    layers = [m for m in reloaded.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 42
    for m in layers:
        assert m.sparsity_structure == (2, 4)
        w = m.dequantized_weight()
        assert bool(((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all())
        assert bool((w[~m.sparsity_mask()] == 0).all())


def test_nf4_recipe(tmp_path, reference_tokenizer):
    pytest.importorskip("bitsandbytes")
    reloaded, _ = _run("nf4.yaml", tmp_path, reference_tokenizer)
    assert sum(isinstance(m, Bnb4bitLinear) for m in reloaded.modules()) == 42

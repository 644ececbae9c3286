"""The pruning recipes validate, and each runs end to end (calibration shrunk to keep the test fast)."""
from pathlib import Path

import pytest

import compress
from compress.calibration import CalibrationSpec
from compress.prune import SparseLinear

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
EXPECTED = {"wanda-2of4.yaml": ("wanda", "nm"), "sparsegpt-50.yaml": ("sparsegpt", "bitmask"),
            "magnitude-50.yaml": ("magnitude", "bitmask")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_runs_and_reloads_packed(tmp_path, reference_tokenizer, name):
    recipe = compress.Recipe.from_yaml(RECIPES / name)
    method, fmt = EXPECTED[name]
    assert recipe.passes[0].args["method"] == method
    if recipe.calibration is not None:
        recipe.calibration = CalibrationSpec(source=recipe.calibration.source, num_samples=2, seq_len=64)
    model, report = compress.apply(compress.load(recipe.model), recipe, tokenizer=reference_tokenizer, progress=False)
    assert report.passes[0].details["sparsity"] == pytest.approx(0.5, abs=1e-3)
    reloaded = compress.load(compress.save(model, tmp_path / "out", recipe_text=recipe.text))
    packed = [m for m in reloaded.modules() if isinstance(m, SparseLinear)]
    assert len(packed) == 42 and {m.format for m in packed} == {fmt}


def test_unquoted_nm_in_yaml_gets_a_clear_message():
    text = "model: builtin:tiny\npasses:\n  - prune: {method: magnitude, structure: 2:4}\n"
    with pytest.raises(compress.RecipeError, match=r'<recipe>:3:.*quote N:M in YAML, e.g. structure: "2:4"'):
        compress.Recipe.from_text(text)

"""recipes/wanda-2of4-recover.yaml validates and runs end to end (calibration and training budget shrunk)."""
from pathlib import Path

import compress
from compress.calibration import CalibrationSpec
from compress.prune import SparseLinear
from compress.prune.masks import is_nm

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "wanda-2of4-recover.yaml"


def test_wanda_2of4_recover_recipe_runs_and_reloads_packed(tmp_path, reference_tokenizer):
    recipe = compress.Recipe.from_yaml(RECIPE)
    assert [p.name for p in recipe.passes] == ["prune", "recover"]
    recipe.calibration = CalibrationSpec(source=recipe.calibration.source, num_samples=2, seq_len=32)
    recipe.passes[1].args.update(max_tokens=2 * 4 * 32, seq_len=32, batch_size=4)
    model, report = compress.apply(compress.load(recipe.model), recipe, tokenizer=reference_tokenizer, progress=False)
    prune, recover = report.passes
    assert recover.details["steps"] == 2 and recover.details["merged"] and "first_kl" in recover.details
    reloaded = compress.load(compress.save(model, tmp_path / "out", recipe_text=recipe.text))
    packed = [m for m in reloaded.modules() if isinstance(m, SparseLinear)]
    assert len(packed) == 42 and all(is_nm(m.dense_weight() != 0, 2, 4) for m in packed)

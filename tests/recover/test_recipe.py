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


import pytest  # noqa: E402

from compress.errors import CompressError  # noqa: E402

CALIBRATION = "calibration: {source: builtin:calibration, num_samples: 2, seq_len: 32}\n"


@pytest.mark.parametrize("passes,match", [
    ("  - quantize: {method: rtn, bits: 4}\n  - recover: {max_tokens: 256}\n",
     "every layer the targets match is quantized by an earlier pass"),
    ("  - prune: {method: magnitude}\n  - recover: {max_tokens: 256, train_modules: ['re:.*router$']}\n",
     "train_modules: target 're:.*router\\$' matches no module"),
    ("  - prune: {method: magnitude}\n  - recover: {max_tokens: 256, resume_from: /nonexistent/ckpt}\n",
     "resume_from /nonexistent/ckpt is not a folder"),
    ("  - recover: {max_tokens: 100000, seq_len: 4096}\n", "seq_len 4096 is longer than the model's context"),
    ("  - recover: {max_tokens: 512, seq_len: 512, batch_size: 2}\n", "max_tokens 512 is less than one step"),
    # an offset per window was allocated: an out-of-memory traceback after the earlier passes (a helper's find)
    ("  - prune: {method: magnitude}\n  - recover: {max_tokens: 100000000000000, seq_len: 64}\n",
     "max_tokens 100000000000000 is 1,562,500,000,000 windows of 64 tokens, more than the 16,777,216 it draws"),
    ("  - prune: {method: magnitude}\n  - recover: {max_tokens: 200}\n",  # 8 windows of the calibration's 32
     "recover: max_tokens 200 is less than one step .*seq_len from the calibration 32"),
    ("  - linearize: {variant: gla}\n  - recover: {max_tokens: 256, train_modules: ['re:.*router$']}\n",
     "train_modules: target 're:.*router\\$' matches no module"),
    ("  - prune: {method: magnitude}\n  - recover: {max_tokens: 256, targets: [lm_head]}\n",
     "target 'lm_head' names only modules ignore 're:.\\*lm_head' leaves out"),
    ("  - prune: {method: magnitude}\n  - recover: {max_tokens: 256, train_modules: ['re:.*rotary_emb$']}\n",
     "train_modules match only modules without parameters \\(\\['model.rotary_emb'\\]"),
])
def test_recover_mistakes_are_found_before_any_pass_runs(tmp_path, passes, match, monkeypatch):
    """What used to fail only after the earlier passes ran (or trained past its budget) fails at their line, before
    any work: the same check that --dry-run makes on a meta model."""
    recipe = compress.Recipe.from_text("model: builtin:tiny\n" + CALIBRATION + "passes:\n" + passes)
    ran = []
    monkeypatch.setattr(compress.get_pass("prune"), "apply", lambda *a, **k: ran.append("prune"))
    monkeypatch.setattr(compress.get_pass("quantize"), "apply", lambda *a, **k: ran.append("quantize"))
    monkeypatch.setattr(compress.get_pass("linearize"), "apply", lambda *a, **k: ran.append("linearize"))
    with pytest.raises(CompressError, match=match):
        compress.apply(compress.load("builtin:tiny"), recipe, progress=False)
    assert ran == []


def test_a_mistake_found_after_the_earlier_passes_names_its_recipe_line():
    """MoM's routers exist only once linearize ran, so train_modules naming none of them fails then: at its line."""
    recipe = compress.Recipe.from_text(
        "model: builtin:tiny\n" + CALIBRATION + "passes:\n"
        "  - linearize: {variant: mom, layers: [0]}\n"
        "  - recover: {max_tokens: 256, train_modules: ['re:.*routr$']}\n", source="r.yaml")
    with pytest.raises(CompressError, match="^r.yaml:5:5: recover: train_modules: target 're:.*routr\\$' matches no"):
        compress.apply(compress.load("builtin:tiny"), recipe, progress=False)


def test_recover_names_the_layers_it_leaves_out(reference_tokenizer):
    recipe = compress.Recipe.from_text(
        "model: builtin:tiny\n" + CALIBRATION + "passes:\n"
        "  - quantize: {method: rtn, bits: 4, targets: ['re:.*mlp.*']}\n"
        "  - recover: {max_tokens: 128, seq_len: 32, batch_size: 4, targets: ['re:.*proj$']}\n")
    _, report = compress.apply(compress.load("builtin:tiny"), recipe, tokenizer=reference_tokenizer, progress=False)
    recover = report.passes[1]
    assert len(recover.modules) == 24 and len(recover.skipped) == 18
    assert all("QuantizedLinear" in why for why in recover.skipped.values())


def test_train_modules_that_also_match_modules_without_parameters_are_kept():
    """A broad pattern catching embed_tokens and rotary_emb trains embed_tokens (only a match of nothing with
    parameters is refused: a review's find)."""
    from compress.recover import Recover

    modules = Recover(max_tokens=256, train_modules=["re:.*emb.*"])._train_modules(compress.load("builtin:tiny"))
    assert {"model.embed_tokens", "model.rotary_emb"} <= set(modules)


def test_the_run_record_has_a_new_files_usual_mode(tmp_path):
    """It was mkstemp's 0600, readable by its owner alone, beside the Trainer's files (0644 under a 022 umask)."""
    import os

    from compress.recover.resume import RECORD, write_record

    umask = os.umask(0o022)
    try:
        write_record(str(tmp_path / "ckd"), {"r": 8})
    finally:
        os.umask(umask)
    assert (tmp_path / "ckd" / RECORD).stat().st_mode & 0o777 == 0o644


def test_a_checkpoint_dir_another_run_trains_into_is_refused_before_any_work(tmp_path, monkeypatch):
    """Two runs of one recipe at once: the second resumed from the first's checkpoints as they were written."""
    from click.testing import CliRunner

    from compress.cli import main
    from compress.recover.resume import training_into

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(
        "model: builtin:tiny\ncalibration: {source: builtin:calibration, num_samples: 4, seq_len: 32}\npasses:\n"
        "  - prune: {method: magnitude, sparsity: 0.5}\n"
        "  - recover: {max_tokens: 128, batch_size: 2, checkpoint_dir: ckd}\n")
    (tmp_path / "ckd").mkdir()
    with training_into("ckd"):  # the first run, training (its own fd: flock tells them apart within a process too)
        result = CliRunner().invoke(main, ["apply", "r.yaml", "-o", "out", "--no-eval"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1  # (no pass ran: no progress)
    assert result.stderr.strip().endswith("recover: checkpoint_dir ckd is in use: another run is training into it "
                                          "now; wait for it to end, or give this run another checkpoint_dir")
    assert not (tmp_path / "out").exists() and list((tmp_path / "ckd").iterdir()) == []
    # once it has ended (or was killed: the kernel lets go of the lock), the folder is free
    result = CliRunner().invoke(main, ["apply", "r.yaml", "-o", "out", "--no-eval"])
    assert result.exit_code == 0, result.output

"""Benchmarks and scripts: what they refuse before any work, and what they must not do (delete a folder they did
not write, compare unlike numbers, mis-resolve relative paths)."""
from pathlib import Path

import pytest

from compress.bench_args import run_cli

REPO = Path(__file__).resolve().parents[1]


def refused(main, args, capsys) -> str:
    """main(args) through run_cli, as the script's `__main__` runs it: exit 2, one line, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, list(args))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------ scripts/train_small.py
@pytest.fixture
def train_small(script_module, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # it imports train_tiny beside it
    return script_module("scripts/train_small.py")


@pytest.mark.parametrize("layout,fragment", [
    ({"notes.txt": "mine"}, "was not written by this script (no training.json)"),
    ({"training.json": "{}", "config.json": "{}", "notes.txt": "mine"}, "holds notes.txt, which this script did not"),
    ({"training.json": "{}", "sub/x": "mine"}, "holds sub"),
])
def test_train_small_refuses_an_out_it_did_not_write(train_small, tmp_path, capsys, layout, fragment):
    """`save` ran shutil.rmtree on --out (and `<out>.partial`) at the first evaluation, whatever they held."""
    out = tmp_path / "model"
    for name, text in layout.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    err = refused(train_small.main, ["--out", str(out)], capsys)
    assert fragment in err
    assert all((out / name).read_text() == text for name, text in layout.items())  # nothing touched


def test_train_small_refuses_a_partial_folder_it_did_not_write(train_small, tmp_path, capsys):
    partial = tmp_path / "model.partial"
    partial.mkdir()
    (partial / "thesis.tex").write_text("mine")
    assert "holds thesis.tex" in refused(train_small.main, ["--out", str(tmp_path / "model")], capsys)
    assert (partial / "thesis.tex").exists()


def test_train_small_save_leaves_a_folder_that_became_foreign(train_small, tmp_path, capsys):
    """Files put in --out while it trains: that checkpoint is not saved, nothing is deleted."""
    from types import SimpleNamespace

    out = tmp_path / "model"
    out.mkdir()
    (out / "training.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    train_small.save(None, None, SimpleNamespace(out=out), 200, 1000, 0, 1.0, {}, 1.0)
    assert "checkpoint at step 200 not saved" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "training.json"]
    assert not (tmp_path / "model.partial").exists()


def test_train_small_accepts_its_own_folders(train_small, tmp_path):
    assert train_small.output_problem(tmp_path / "new") is None
    (tmp_path / "empty").mkdir()
    assert train_small.output_problem(tmp_path / "empty") is None
    assert train_small.output_problem(REPO / "compress" / "builtin" / "small") is None  # the default, re-trained


# ---------------------------------------------------------------------------------------------- benchmarks/prune.py
def test_prune_reloads_the_pruned_model_at_the_dense_models_dtype(script_module, monkeypatch):
    """The resident ratios divide the reloaded model's bytes by the float32 dense model's: `compress.load(out)`
    (dtype auto) gave bf16 on CPUs with AVX512-BF16, a false 2x saving."""
    import compress

    bench = script_module("benchmarks/prune.py")
    monkeypatch.setattr(bench, "METHODS", ("magnitude",))
    monkeypatch.setattr(bench, "STRUCTURES", ("2:4",))
    dtypes, load = [], compress.load
    monkeypatch.setattr(compress, "load", lambda *a, **k: dtypes.append(k.get("dtype", "auto")) or load(*a, **k))
    rows = bench.quality_rows(1, 1, progress=False, model_name="builtin:tiny")
    assert len(rows) == 2 and dtypes == ["float32", "float32"]


# -------------------------------------------------------------------------------------------- benchmarks/compose.py
def test_compose_runs_relative_recipes_and_models_from_anywhere(script_module, monkeypatch, tmp_path):
    """Relative --recipes / --model were checked from the current folder, then given to `compress apply` running
    in the repository's folder, where they named nothing."""
    bench = script_module("benchmarks/compose.py")
    (tmp_path / "r.yaml").write_text("passes: []\n")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(bench, "measure", lambda recipe, out, *a: seen.append((recipe, a[-1])) or {"recipe": "r"})
    monkeypatch.setattr(bench, "print_table", lambda *a: None)
    bench.main(["--recipes", "r.yaml", "--model", "m"])
    assert seen == [(tmp_path / "r.yaml", str(tmp_path / "m"))]


# ------------------------------------------------------------------------------------ benchmarks/interval_blocks.py
def test_interval_blocks_prints_a_dash_for_an_undefined_widening(script_module, monkeypatch, capsys):
    """Two models scoring alike: every interval has width 0 and the widening is None (the table raised TypeError)."""
    import torch

    bench = script_module("benchmarks/interval_blocks.py")
    rows = [{"block": b, "samples": 8 // b, "ppl_ratio": 1.0, "ppl_ratio_ci95": [1.0, 1.0], "half_width": 0.0,
             "standard_error": 0.0, "widening": None, "se_widening": None} for b in (1, 4)]
    monkeypatch.setattr(bench, "block_intervals", lambda *a: rows)
    monkeypatch.setattr(bench, "heldout_windows", lambda *a, **k: torch.zeros(8, 256, dtype=torch.long))
    monkeypatch.setattr(bench.compress, "load", lambda *a, **k: None)
    monkeypatch.setattr(bench.compress, "load_tokenizer", lambda *a, **k: None)
    bench.main(["builtin:tiny", "builtin:tiny", "--windows", "8"])
    out = capsys.readouterr().out
    assert "half-width 0.0000 (-; standard error -)" in out


# -------------------------------------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("script,args,fragment", [
    ("build_eval_fixtures.py", ["--passkey-lengths", "abc"], "argument --passkey-lengths: 'abc' is not a whole number"),
    ("build_eval_fixtures.py", ["--passkey-lengths", "256,10"], "argument --passkey-lengths: 10 must be at least 64"),
    ("build_eval_fixtures.py", ["--num", "-3"], "argument --num: -3 must be at least 1"),
    ("build_eval_fixtures.py", ["--out", "{file}"], "is a file, not a folder"),
    ("build_eval_fixtures.py", ["--out", "{tmp}/new", "--agreement-num", "100000"],
     "--agreement-num 100000: the held-out text holds"),
    ("copy_diagnostics.py", ["--heads", "bogus"], "argument --heads: 'bogus': write layer:head pairs"),
    ("copy_diagnostics.py", ["builtin:tiny", "--heads", "9:0"], "--heads 9:0: the model has layers 0 .. 5"),
    ("copy_diagnostics.py", ["/nonexistent"], "error: model /nonexistent does not exist"),
    ("copy_diagnostics.py", ["--spans", "0"], "argument --spans: 0 must be at least 1"),
    ("fit_copy_heads.py", ["--init-from", "/nonexistent", "--out", "{tmp}/o"], "--init-from /nonexistent: no such"),
    ("fit_copy_heads.py", ["--init-from", "{tiny}", "--out", "{file}"], "is a file, not a folder"),
    ("fit_copy_heads.py", ["--init-from", "{tiny}", "--out", "{tmp}/o", "--heads", "bogus"],
     "argument --heads: 'bogus'"),
    ("fit_copy_heads.py", ["--init-from", "{tiny}", "--out", "{tmp}/o", "--heads", "0:99"],
     "--heads 0:99: the model has layers 0 .. 5 and heads"),
    ("fit_copy_heads.py", ["--init-from", "{tiny}", "--out", "{tmp}/o", "--numbers", "2"],
     "argument --numbers: 2.0 must be at most 1"),
])
def test_scripts_refuse_bad_arguments(script, args, fragment, script_module, capsys, tmp_path):
    (tmp_path / "file").write_text("mine")
    values = {"file": tmp_path / "file", "tmp": tmp_path, "tiny": REPO / "compress" / "builtin" / "tiny"}
    err = refused(script_module(f"scripts/{script}").main, [a.format(**values) for a in args], capsys)
    assert fragment in err, err
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "new").exists()


@pytest.mark.parametrize("script", ["build_eval_fixtures.py", "copy_diagnostics.py", "fit_copy_heads.py"])
def test_scripts_run_main_through_run_cli(script):
    source = (REPO / "scripts" / script).read_text()
    assert "run_cli(main)" in source[source.index('if __name__ == "__main__":'):]

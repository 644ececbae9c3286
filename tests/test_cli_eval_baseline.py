"""What `compress eval` and `compress apply` compare against, and what they leave unscored, said where it matters."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from compress.calibration import builtin_text
from compress.cli import main
from compress.evaluate import text_token_ids


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("baseline")
    recipe = folder / "r.yaml"
    recipe.write_text("model: builtin:tiny\npasses:\n  - prune: {method: magnitude, sparsity: 0.5}\n")
    result = run("apply", recipe, "--output", folder / "mag", "--no-eval")
    assert result.exit_code == 0, result.output
    return folder / "mag"


def test_a_checkpoint_as_its_own_baseline_is_refused(pruned):
    """It gave KL 0, agreement 1, exit 0 and a note about "two different models"."""
    result = run("eval", pruned, "--baseline", f"{pruned}/", "--max-windows", 1, "--no-speed")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is the model itself" in result.stderr and "builtin:tiny" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2


def test_apply_on_a_compressed_input_names_its_baseline(pruned, tmp_path):
    """apply compares with its input (the recipe's own cost); with an input compressed already it says so, as
    `compress eval` on the output compares with the original instead."""
    recipe = tmp_path / "q.yaml"
    recipe.write_text("passes:\n  - quantize: {method: rtn, bits: 4, group_size: 64}\n")
    result = run("apply", recipe, "--model", pruned, "--output", tmp_path / "q", "--eval-windows", 1, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["eval"]["baseline"] == str(pruned) and summary["input_made_from"] == "builtin:tiny"
    assert f"compares with this run's input {pruned}, itself compressed from builtin:tiny" in result.stderr
    table = run("apply", recipe, "--model", pruned, "--output", tmp_path / "q", "--eval-windows", 1, "--overwrite")
    assert table.exit_code == 0, table.output
    assert "baseline " + str(pruned) in " ".join(table.stdout.split()) and "input " in table.stdout


def test_a_text_tail_shorter_than_a_window_is_said(pruned, tmp_path, reference_tokenizer):
    """A text of 1.9 windows was scored as one window, its last 0.9 dropped without a word."""
    text = builtin_text("builtin:heldout")[:4000]
    tokens = text_token_ids(reference_tokenizer, text).numel()
    assert tokens > 512
    (tmp_path / "t.txt").write_text(text)
    result = run("eval", pruned, "--text", tmp_path / "t.txt", "--seq-len", 256, "--no-speed", "--json")
    assert result.exit_code == 0, result.output
    tail = tokens % 256
    assert f"its last {tail} tokens, less than a window, not scored" in json.loads(result.stdout)["protocol"]
    # --max-windows cutting the text short is the user's choice: nothing said
    short = run("eval", pruned, "--text", tmp_path / "t.txt", "--seq-len", 256, "--max-windows", 1, "--no-speed",
                "--json")
    assert short.exit_code == 0 and "not scored" not in json.loads(short.stdout)["protocol"]


def test_a_baseline_with_a_compressed_cache_is_read_through_it(tmp_path):
    """apply over a KIVI-2 input: the output inherits the cache and is scored through it; so is the input, its
    baseline (a plain forward of the input put the cache's cost, KL 0.007, on an 8-bit quantize's account)."""
    kivi = tmp_path / "kivi.yaml"
    kivi.write_text("model: builtin:tiny\npasses:\n  - gear_kv: {method: kivi, bits: 2}\n")
    assert run("apply", kivi, "--output", tmp_path / "kv", "--no-eval").exit_code == 0
    recipe = tmp_path / "q.yaml"
    recipe.write_text("passes:\n  - quantize: {method: rtn, bits: 8}\n")
    result = run("apply", recipe, "--model", tmp_path / "kv", "--output", tmp_path / "q", "--eval-windows", 2,
                 "--json", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    ev = json.loads(result.stdout)["eval"]
    assert "the baseline through its own" in ev["protocol"] and ev["kl"] < 0.001 and ev["top1_agreement"] > 0.98
    same = run("eval", tmp_path / "kv", "--baseline", tmp_path / "kv", "--max-windows", 1, "--no-speed")
    assert same.exit_code == 2 and "is the model itself" in same.stderr


def test_the_recorded_source_is_found_from_the_checkpoint_folder(tmp_path, monkeypatch):
    """A source recorded relative to the checkpoint ("../base") was printed as is, pointing elsewhere from the
    working directory."""
    import compress

    compress.load("builtin:tiny", dtype="float32").save_pretrained(tmp_path / "base")
    compress.load_tokenizer("builtin:tiny").save_pretrained(tmp_path / "base")
    recipe = tmp_path / "p.yaml"
    recipe.write_text("passes:\n  - prune: {method: magnitude, sparsity: 0.5}\n")
    assert run("apply", recipe, "--model", tmp_path / "base", "--output", tmp_path / "ck1", "--no-eval").exit_code == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    rtn = tmp_path / "q.yaml"
    rtn.write_text("passes:\n  - quantize: {method: rtn, bits: 8}\n")
    result = run("apply", rtn, "--model", tmp_path / "ck1", "--output", tmp_path / "ck2", "--no-eval", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input_made_from"] == str((tmp_path / "base").resolve())
    refused = run("eval", tmp_path / "ck1", "--baseline", tmp_path / "ck1", "--no-speed")
    assert refused.exit_code == 2 and f"({(tmp_path / 'base').resolve()})" in refused.stderr

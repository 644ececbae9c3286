"""What the user typed or stored, printed back as text: square brackets in paths and recipes are not rich markup,
bytes that are not UTF-8 are refused before any work, and a hand-edited checkpoint (its recorded source model, its
recipe.yaml) gives one line, not a traceback."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from compress.cli import main

RECIPE = ("# a [/] b [bold]not bold[/bold] :smile:\nmodel: builtin:tiny\n"
          "calibration: {source: builtin:calibration, num_samples: 4, seq_len: 64}\n"
          "passes:\n  - prune: {method: magnitude, sparsity: 0.5}\n")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2, result.output
    for f in fragments:
        assert f in result.output, result.output


@pytest.fixture(scope="module")
def bracket_checkpoint(tmp_path_factory):
    """A checkpoint at `o[/]x_[v2]` (`o[` holding `]x_[v2]`), from a recipe whose comment is rich markup; the apply's
    printed summary."""
    folder = tmp_path_factory.mktemp("brackets")
    (folder / "r[1].yaml").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # short relative paths: the summary line is not wrapped
        result = run("apply", "r[1].yaml", "-o", "o[/]x_[v2]", "--eval-windows", 1)
    assert result.exit_code == 0, result.output
    return folder, folder / "o[" / "]x_[v2]", result.output


def test_brackets_in_paths_print_as_typed(bracket_checkpoint):
    _, out, printed = bracket_checkpoint
    assert "checkpoint: o[/]x_[v2]  (" in printed
    assert (out / "model.safetensors").exists() or any(out.glob("*.safetensors"))


def test_recipe_with_markup_inspects_as_written(bracket_checkpoint, monkeypatch):
    folder, _, _ = bracket_checkpoint
    monkeypatch.chdir(folder)
    result = run("inspect", "o[/]x_[v2]")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("o[/]x_[v2]  format")
    assert "# a [/] b [bold]not bold[/bold] :smile:" in result.output


@pytest.mark.parametrize("value, kind", [(5, "an int"), (["a"], "a list")])
def test_eval_with_a_non_string_recorded_source_is_a_damaged_config(bracket_checkpoint, tmp_path, value, kind):
    _, out, _ = bracket_checkpoint
    damaged = tmp_path / "ck"
    shutil.copytree(out, damaged)
    config = json.loads((damaged / "config.json").read_text())
    config["compression"]["source_model"] = value
    (damaged / "config.json").write_text(json.dumps(config))
    result = run("eval", damaged, "--max-windows", 1, "--no-speed")
    user_error(result, "`compression.source_model` is " + kind + ", not a string")  # a damaged config, as on load


def test_inspect_with_a_recipe_that_is_not_utf8(bracket_checkpoint, tmp_path, monkeypatch):
    _, out, _ = bracket_checkpoint
    shutil.copytree(out, tmp_path / "ck")
    (tmp_path / "ck" / "recipe.yaml").write_bytes(b"model: builtin:tiny\n\xff\xfe bad")
    monkeypatch.chdir(tmp_path)  # a short path: the line is not wrapped
    result = run("inspect", "ck")
    assert result.exit_code == 0, result.output
    assert "recipe: not shown: ck/recipe.yaml:2: not UTF-8 text (byte 0xff)" in result.output
    data = json.loads(run("inspect", "ck", "--json").stdout)
    assert data["recipe"] is None and "not UTF-8" in data["recipe_problem"]


def test_non_utf8_arguments_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE)
    # surrogateescape: how Python hands over argv bytes that are not UTF-8
    user_error(run("generate", "builtin:tiny", "--prompt", "\udcff\udcfe"), "'\\xff\\xfe' is not UTF-8 text")
    user_error(run("apply", "r.yaml", "-o", "out_\udcff", "--no-eval"), "'out_\\xff' is not UTF-8 text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.skipif(shutil.which("compress") is None, reason="console script not installed")
def test_non_utf8_bytes_on_the_real_command_line(tmp_path):
    proc = subprocess.run([b"compress", b"generate", b"builtin:tiny", b"--prompt", b"\xff\xfe"],
                          capture_output=True, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    expected = b"error: the argument '\\xff\\xfe' is not UTF-8 text; give paths and text in UTF-8"
    assert proc.stderr.strip().splitlines() == [expected]


def test_inspect_says_what_the_passes_found_from_the_stored_report(bracket_checkpoint, tmp_path, monkeypatch):
    """The figures `apply` prints under its pass table (activation sparsity's inactive share, VQ-Logits' calibration
    KLs) come back with `inspect` from the report.json beside the weights; a damaged report is said, not fatal."""
    _, out, _ = bracket_checkpoint
    shutil.copytree(out, tmp_path / "ck")
    report = json.loads((tmp_path / "ck" / "report.json").read_text())
    report["passes"].append({"name": "activation_sparsity", "details": {
        "sparsity": 0.441, "ppl_increase": 0.0064, "target_ppl_increase": 0.007}})
    (tmp_path / "ck" / "report.json").write_text(json.dumps(report))
    monkeypatch.chdir(tmp_path)
    result = run("inspect", "ck")
    assert result.exit_code == 0, result.output
    assert "activation_sparsity found: 44.1% of the MLPs' neuron activations inactive" in " ".join(
        result.output.split())
    data = json.loads(run("inspect", "ck", "--json").stdout)
    assert [name for name, _ in data["findings"]] == ["activation_sparsity"] and data["report_problem"] is None
    (tmp_path / "ck" / "report.json").write_text('{"passes": 3}')
    result = run("inspect", "ck")
    assert result.exit_code == 0 and "what the passes found: not shown: ck/report.json cannot be read" in result.output

"""`compress eval --suite kick`: the JSON keys, the table, the plot, and mistakes that exit 2."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("lm_eval")

from compress.cli import main  # noqa: E402
from compress.eval.suite import AGREEMENT_TASKS  # noqa: E402


def test_eval_suite_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "suite.png"
    result = CliRunner().invoke(main, ["eval", "builtin:tiny", "--baseline", "builtin:tiny", "--suite", "kick",
                                       "--suite-limit", "1", "--max-windows", "1", "--no-speed", "--json",
                                       "--plot", str(png)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert {"perplexity", "kl", "top1_agreement", "suite", "suite_baseline"} <= out.keys()
    suite = out["suite"]
    assert set(AGREEMENT_TASKS) | {"copy", "mc", "cloze_open", "cloze_closed", "passkey_256"} <= suite.keys()
    assert all(isinstance(v, float) for v in suite.values())
    assert suite["agreement_top1"] == 1.0 and suite == out["suite_baseline"]
    # the model against itself: every lm-eval task's paired change is an interval around 0 (one document each)
    assert set(out["suite_change_ci95"]) == {t for t in out["suite_ci95"]}
    assert all(lo <= 0 <= hi for lo, hi in out["suite_change_ci95"].values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out["suite_plot"] == str(png)


@pytest.mark.parametrize("args, message", [
    (["--plot", "x.png"], "add --suite kick"),
    (["--suite", "kick", "--plot", "x.jpg"], ".png"),
    (["--suite-dir", "."], "not a suite folder"),
])
def test_suite_mistakes_exit_2_before_loading(args, message):
    result = CliRunner().invoke(main, ["eval", "builtin:tiny", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_no_git_noise_outside_a_repository(tmp_path, monkeypatch, capfd):
    """lm-eval asks git for a commit hash; outside a repository git's 'fatal: not a git repository' used to reach
    the user's terminal. capfd reads file descriptor 2 itself, which git's process writes to."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    result = CliRunner().invoke(main, ["eval", "builtin:tiny", "--suite", "kick", "--suite-limit", "1",
                                       "--max-windows", "1", "--no-speed", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "suite" in json.loads(result.stdout)
    captured = capfd.readouterr()
    assert "not a git repository" not in captured.err + result.output


def test_plot_location_is_checked_before_any_work_and_never_created(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.png").mkdir()
    cases = [(tmp_path / "afile" / "p.png", "is a file, not a folder"),
             (tmp_path / "no" / "dir" / "p.png", "no such folder"),
             (tmp_path / "adir.png", "")]
    for plot, message in cases:
        result = CliRunner().invoke(main, ["eval", "builtin:tiny", "--suite", "kick", "--suite-limit", "1",
                                           "--max-windows", "1", "--no-speed", "--plot", str(plot)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.png", "afile"]


def test_plot_labels_are_text(tmp_path):
    """Model names are the legend's labels: a `$` in one is not matplotlib's math (it used to fail at the write,
    after the whole suite); the PNG is written whole, with no temporary file left beside it."""
    pytest.importorskip("matplotlib")
    from compress.eval.plot import plot_suite

    png = plot_suite({"copy": 0.5}, {"copy": 0.25}, tmp_path / "p.png", "out_$x^$ [/]", "base$")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["p.png"]

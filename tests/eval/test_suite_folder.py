"""Suite folders and lm-eval tasks that cannot run: refused in a line or two naming the file (and line), before
any model loads; agreement rows longer than a model's context are skipped, as the pass-key tasks are. A tester's
finds (each used to give a traceback, or to score anyway)."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
from click.testing import CliRunner

pytest.importorskip("lm_eval")

from compress.cli import main  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress.eval.lm_eval_tasks import DATA_DIR, lm_eval_results, wrap_model  # noqa: E402
from compress.eval.suite import AGREEMENT_TASKS, run_suite  # noqa: E402


def short_copy(model, context: int):
    short = copy.deepcopy(model)
    short.config.max_position_embeddings = context
    return short


def test_agreement_rows_longer_than_either_context_are_skipped(reference_model, reference_tokenizer):
    """The shipped rows are 96 + 32 tokens in builtin:tiny's tokenizer (greedy: 96 + 16): a 100-token model or
    baseline cannot read them; they were scored anyway (transformers only warns)."""
    short = short_copy(reference_model, 100)
    for model, baseline, whose in ((short, reference_model, "model's"), (reference_model, short, "baseline's")):
        out = run_suite(model, reference_tokenizer, baseline, tasks=list(AGREEMENT_TASKS), limit=2)
        assert out["skipped"] == {t: f"prompts longer than the {whose} context (100 tokens)" for t in AGREEMENT_TASKS}
        assert out["model"] == out["baseline"] == {}
    fits = run_suite(short_copy(reference_model, 128), reference_tokenizer, reference_model,
                     tasks=["agreement_top1"], limit=2)
    assert fits["skipped"] == {} and fits["model"] == {"agreement_top1": 1.0}


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def break_mc_line(folder):
    lines = (folder / "mc.jsonl").read_text().splitlines(keepends=True)
    (folder / "mc.jsonl").write_text(lines[0] + lines[1][:-10] + "\n" + "".join(lines[2:]))


MALFORMED = {
    "bad JSON line": (break_mc_line, "mc.jsonl:2: not valid JSON"),
    "no context": (lambda d: (d / "mc.jsonl").write_text(jsonl([{"choices": ["a", "b"], "label": 0}])),
                   "mc.jsonl:1 (task kick_mc, mc.yaml): 'context' missing"),
    "empty mc": (lambda d: (d / "mc.jsonl").write_text(""), "mc.jsonl (task kick_mc, mc.yaml): no rows"),
    "label out of range": (lambda d: (d / "mc.jsonl").write_text(jsonl([{"context": "x", "choices": ["a"],
                                                                          "label": 1}])),
                           "mc.jsonl:1 (task kick_mc, mc.yaml): 'label' 1 is not the index of the true choice"),
    "answer not text": (lambda d: (d / "passkey_256.jsonl").write_text(jsonl([{"context": "x", "answer": 5}])),
                        "passkey_256.jsonl:1 (task kick_passkey_256, passkey_256.yaml): 'answer' 5 is not"),
    "empty agreement": (lambda d: (d / "agreement.jsonl").write_text("\n"), "agreement.jsonl: no rows"),
    "empty continuation": (lambda d: (d / "agreement.jsonl").write_text(
        jsonl([{"context": "a b c", "continuation": "d"}, {"context": "a b c", "continuation": ""}])),
        "agreement.jsonl:2: 'continuation' \"\" is not non-empty text"),
    "agreement row not an object": (lambda d: (d / "agreement.jsonl").write_text("[1, 2]\n"),
                                    "agreement.jsonl:1: a row is a JSON object, not list"),
    "task without the prefix": (lambda d: (d / "mc.yaml").write_text(
        (d / "mc.yaml").read_text().replace("task: kick_mc", "task: mc")), "mc.yaml: `task:` must name the task"),
    "broken YAML": (lambda d: (d / "mc.yaml").write_text(
        (d / "mc.yaml").read_text().replace("task: kick_mc", "task: [kick_mc")),
        "mc.yaml:2:4: not valid YAML: expected ',' or ']'"),
    "fixture missing": (lambda d: (d / "mc.jsonl").unlink(), "mc.yaml: its fixture mc.jsonl is not a file of"),
    "template field missing": (lambda d: (d / "mc.yaml").write_text(
        (d / "mc.yaml").read_text().replace("{{context}}", "{{question}}")),
        "mc.jsonl:1 (task kick_mc, mc.yaml): 'question' missing"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_suite_folder_is_refused_before_any_model_loads(case, tmp_path, monkeypatch, reference_model,
                                                                     reference_tokenizer):
    import re

    import compress.models

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the suite folder was checked")

    monkeypatch.setattr(compress.models, "load", no_load)
    folder = tmp_path / "s2"
    shutil.copytree(DATA_DIR, folder)
    change, message = MALFORMED[case]
    change(folder)
    result = CliRunner().invoke(main, ["eval", "builtin:tiny", "--no-speed", "--max-windows", "1", "--suite-dir",
                                       str(folder), "--suite-limit", "2"])
    assert result.exit_code == 2, result.output
    assert message in result.output and str(folder) in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2, result.output
    with pytest.raises(CompressError, match=re.escape(message)):  # and from the API, before any scoring
        run_suite(reference_model, reference_tokenizer, reference_model, tasks_dir=folder, limit=2)


def test_a_task_reads_the_fixture_its_yaml_names(reference_model, reference_tokenizer, tmp_path):
    """The context check read `<task name>.jsonl`, not the YAML's `dataset_kwargs.fixture`: 'no such file'."""
    folder = tmp_path / "s2"
    shutil.copytree(DATA_DIR, folder)
    (folder / "mc.yaml").rename(folder / "other.yaml")
    (folder / "other.yaml").write_text((folder / "other.yaml").read_text().replace("task: kick_mc", "task: kick_other"))
    out = run_suite(short_copy(reference_model, 16), reference_tokenizer, tasks_dir=folder, tasks=["other_norm"],
                    limit=2)
    assert out["skipped"] == {"other_norm": "prompts longer than the model's context (16 tokens)"}


def test_unknown_lm_eval_task_is_a_user_error(reference_model, reference_tokenizer):
    lm = wrap_model(reference_model, reference_tokenizer)
    with pytest.raises(CompressError, match=r"unknown lm-eval task\(s\) kick_bogus in .*\navailable: kick, "
                                            r"kick_cloze_closed, "):
        lm_eval_results(lm, ["kick_bogus"])
    with pytest.raises(CompressError, match=r"kick_mcc in .* \(did you mean kick_mc\?\)"):
        lm_eval_results(lm, ["kick_mcc"])


def test_a_hub_dataset_that_cannot_be_reached_is_a_user_error(reference_model, reference_tokenizer, tmp_path,
                                                              monkeypatch):
    """A task whose data is on the hub, offline and not cached: lm-eval's ConnectionError, now naming the task
    (offline mode set here, so that nothing waits on the network)."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    (tmp_path / "hub.yaml").write_text(
        "task: kick_hub\ndataset_path: compress-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    with pytest.raises(CompressError, match=r"lm-eval task\(s\) kick_hub: the dataset cannot be reached \(.*"
                                            r"compress-tests/no-such-dataset"):
        lm_eval_results(wrap_model(reference_model, reference_tokenizer), ["kick_hub"], tmp_path)

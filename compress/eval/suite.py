"""The LLM-KICK-style suite: what perplexity hides, scored for a model and its baseline.

Tasks (fixtures in compress/eval/data/, built by scripts/build_eval_fixtures.py; scores in [0, 1], higher is better
unless named in LOWER_IS_BETTER):
- agreement_kl / agreement_top1 / agreement_greedy: next-token agreement with the baseline on held-out
  continuations (agreement.py; needs a baseline: 0 / 1 / 1 when the model is the baseline);
- passkey_<L>: pass-key retrieval at ~L tokens of context (lm-eval, greedy digits exact);
- copy: compress.eval.probes.copy_probe (seeded random tokens, repeated; greedy accuracy on the repeat);
- cloze_open / cloze_closed: a 3-word span of a held-out paragraph, with the paragraph in context or not (lm-eval,
  greedy span exact); the gap between them is in-context retrieval;
- mc / mc_norm: the true continuation of a held-out paragraph among 4, by log-likelihood (lm-eval's acc), and by
  log-likelihood per character of each choice (acc_norm: summed log-likelihood favours the shortest choice).
lm-eval cannot compare two models, so agreement runs on our side over the same kind of fixture."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..errors import CompressError
from .lm_eval_tasks import DATA_DIR, LM_EVAL_PREFIX, lm_eval_results, suite_task_names, task_configs, wrap_model

SUITES = {"kick": DATA_DIR}
AGREEMENT_TASKS = ("agreement_kl", "agreement_top1", "agreement_greedy")
LOWER_IS_BETTER = {"agreement_kl"}
SELF_AGREEMENT = {"agreement_kl": 0.0, "agreement_top1": 1.0, "agreement_greedy": 1.0}
NORMALISED = "_norm"  # a task whose config lists acc_norm reports it as `<task>_norm` (e.g. mc_norm)


def sorted_tasks(names: list[str]) -> list[str]:
    """Pass-key tasks by length first, then the rest by name."""
    key = lambda n: (0, int(n.split("_")[1]), "") if re.fullmatch(r"passkey_\d+", n) else (1, 0, n)  # noqa: E731
    return sorted(names, key=key)


def suite_dir(suite: str | None, directory: str | Path | None) -> Path:
    if directory is not None:
        path = Path(directory)
        if not (path / "agreement.jsonl").exists() or not list(path.glob("*.yaml")):
            raise CompressError(f"{path} is not a suite folder (YAML task files + agreement.jsonl); build one with "
                                "scripts/build_eval_fixtures.py --out DIR")
        return path
    if suite not in SUITES:
        raise CompressError(f"unknown suite {suite!r}; available: {', '.join(SUITES)}")
    return SUITES[suite]


def read_rows(path: Path) -> list[dict]:
    return [row for _, row in numbered_rows(path)]


def numbered_rows(path: Path) -> list[tuple[int, dict]]:
    """A JSON-lines fixture's (line number, row), blank lines skipped; a CompressError names a bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CompressError(f"{path}: cannot be read as UTF-8 JSON lines ({exc})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CompressError(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(row, dict):
                raise CompressError(f"{path}:{number}: a row is a JSON object, not {type(row).__name__}")
            rows.append((number, row))
    return rows


TEMPLATE_FIELD = re.compile(r"\{\{\s*(\w+)")


def check_suite_folder(tasks_dir: Path) -> dict[str, Path]:
    """{short task name: its fixture file} of a suite folder, every YAML and JSON-lines file checked first (before
    any model loads): the keys this module, agreement.py and the YAML's templates read are in every row, of their
    type (lm-eval renders a missing key as empty text, and fails deep in a run on others)."""
    fixtures = {}
    for task, (yaml_path, config) in task_configs(tasks_dir).items():
        path = Path(tasks_dir) / config["dataset_kwargs"]["fixture"]
        if config.get("output_type") == "multiple_choice":
            required = {"context": str, "choices": list, "label": int}
        else:
            required = {"context": str, "answer": str}
        templates = [config.get(k) for k in ("doc_to_text", "doc_to_target", "doc_to_choice")]
        for field in {f for t in templates if isinstance(t, str) for f in TEMPLATE_FIELD.findall(t)} | {
                t for t in templates if isinstance(t, str) and t.isidentifier()}:
            required.setdefault(field, object)
        fixtures[task.removeprefix(LM_EVAL_PREFIX)] = check_rows(path, required, f" (task {task}, {yaml_path.name})")
    check_rows(Path(tasks_dir) / "agreement.jsonl", {"context": str, "continuation": str})
    return fixtures


def check_rows(path: Path, required: dict[str, type], what: str = "") -> Path:
    """`path`, once it has rows and each has the `required` keys, of their type (`object`: any), not empty."""
    rows = numbered_rows(path)
    if not rows:
        raise CompressError(f"{path}{what}: no rows; each line is a JSON object")
    for number, row in rows:
        for key, kind in required.items():
            value = row.get(key)
            bad = (key not in row or not isinstance(value, kind) or isinstance(value, bool) and kind is not object
                   or kind in (str, list) and not value
                   or key == "choices" and not all(isinstance(c, str) and c for c in value)
                   or key == "label" and isinstance(row.get("choices"), list) and not 0 <= value < len(row["choices"]))
            if bad:
                problem = "missing" if key not in row else f"{json.dumps(value)[:40]} is not {EXPECTED[key, kind]}"
                raise CompressError(f"{path}:{number}{what}: {key!r} {problem}")
    return path


EXPECTED = {("context", str): "non-empty text", ("answer", str): "non-empty text",
            ("continuation", str): "non-empty text", ("choices", list): "a non-empty list of non-empty texts",
            ("label", int): "the index of the true choice"}


def too_long(fixture: Path, tokenizer, max_length: int, limit: int | None) -> bool:
    """Whether any prompt (+ answer) of a task's fixture exceeds the model's context (lm-eval would cut the left
    of the prompt, silently dropping a pass key buried early)."""
    rows = read_rows(fixture)[:limit]
    answers = [r["answer"] if "answer" in r else max(r["choices"], key=len) for r in rows]
    return any(len(tokenizer(r["context"] + " " + a, add_special_tokens=False, verbose=False)["input_ids"])
               > max_length
               for r, a in zip(rows, answers))


def run_suite(model, tokenizer, baseline=None, *, tasks_dir: Path = DATA_DIR, tasks: list[str] | None = None,
              limit: int | None = None, batch_size: int = 8, greedy_tokens: int = 16, copy_span: int = 64,
              copy_num: int = 8, seed: int = 0, baseline_scores: dict[str, float] | None = None,
              baseline_per_doc: dict[str, dict | None] | None = None, baseline_tokenizer=None) -> dict:
    """Score `model` (and `baseline`, if given) on the suite. Returns {"model": {task: score}, "baseline":
    {task: score} | None, "model_ci95" / "baseline_ci95": {task: [lo, hi]} (lm-eval tasks; None when the baseline's
    scores were given), "change_ci95": {task: [lo, hi]} of model minus baseline accuracy, paired over the same
    documents (empty without a baseline scored in this run or its `baseline_per_doc`), "model_per_doc": {task:
    {doc_id: acc}} (lm-eval tasks: what a later run pairs with as `baseline_per_doc`), "skipped": {task: reason},
    "seconds": float}. `tasks` selects by short name (`mc`,
    `passkey_512`, `copy`, `agreement_top1`, ...); `limit` caps the examples per lm-eval task; `baseline_scores`
    (the baseline's own "model" scores from an earlier run) saves scoring the baseline again. Both models are
    scored on the ids `tokenizer` cuts: the baseline's own tokenizer (`baseline_tokenizer`, by default the one saved
    where compress.load read the baseline from) must read them as the same tokens (`check_baseline_tokenizer`)."""
    from ..models import context_length
    from .probes import copy_probe

    start = time.perf_counter()
    fixtures = check_suite_folder(tasks_dir)  # a malformed folder fails here, not inside lm-eval
    lm_names = sorted_tasks(list(fixtures))
    normalised = {n.removeprefix(LM_EVAL_PREFIX) for n in suite_task_names(tasks_dir, "acc_norm")}
    passkeys = [n for n in lm_names if n.startswith("passkey_")]
    available = [*AGREEMENT_TASKS, *passkeys, "copy",
                 *[s for n in lm_names if n not in passkeys for s in ([n, n + NORMALISED] if n in normalised else [n])]]
    wanted = tasks or available
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise CompressError(f"unknown suite task(s) {', '.join(unknown)}; available: {', '.join(available)}")
    if baseline is not None:
        check_baseline_tokenizer(tokenizer, baseline, baseline_tokenizer)
    # both models are scored on the same prompts: a task longer than either's context is skipped, and the copy
    # probe and lm-eval's window are sized to the shorter one
    contexts = {"model's": context_length(model.config) or 2048}
    if baseline is not None and (context_length(baseline.config) or 2048) < contexts["model's"]:
        contexts["baseline's"] = context_length(baseline.config) or 2048
    max_length = min(contexts.values())
    skipped: dict[str, str] = {}
    lm_tasks = []
    for name in dict.fromkeys(n.removesuffix(NORMALISED) if n.removesuffix(NORMALISED) in normalised else n
                              for n in wanted):  # mc_norm is scored by running mc
        if name == "copy" or name in AGREEMENT_TASKS:
            continue
        short = next((f"{whose} context ({n} tokens)" for whose, n in contexts.items()
                      if too_long(fixtures[name], tokenizer, n, limit)), None)
        if short:  # under the names asked for (mc_norm alone: not under mc)
            skipped.update({n: f"prompts longer than the {short}" for n in (name, name + NORMALISED) if n in wanted})
        else:
            lm_tasks.append(LM_EVAL_PREFIX + name)
    if baseline is None:
        skipped.update({t: "no baseline" for t in AGREEMENT_TASKS if t in wanted})
    elif any(t in wanted for t in AGREEMENT_TASKS):  # rows are trimmed (agreement.py), then scored and continued
        from .agreement import rectangular

        prefixes, continuations = rectangular(tokenizer, read_rows(tasks_dir / "agreement.jsonl"), limit)
        needed = prefixes.shape[1] + max(continuations.shape[1], greedy_tokens)
        short = next((f"{whose} context ({n} tokens)" for whose, n in contexts.items() if needed > n), None)
        if short:
            skipped.update({t: f"prompts longer than the {short}" for t in AGREEMENT_TASKS if t in wanted})

    per_doc: dict[int, dict[str, dict]] = {}  # id(model) -> {task: {doc_id: acc}}

    def scores_of(m) -> tuple[dict[str, float], dict[str, list[float]]]:
        out, ci = {}, {}
        if lm_tasks:
            results = lm_eval_results(wrap_model(m, tokenizer, batch_size, max_length), lm_tasks, tasks_dir, limit,
                                      seed)
            docs = per_doc.setdefault(id(m), {})
            for t in lm_tasks:
                for metric, name in (("acc", t.removeprefix(LM_EVAL_PREFIX)),
                                     ("acc_norm", t.removeprefix(LM_EVAL_PREFIX) + NORMALISED)):
                    if f"{metric},none" in results[t] and name in wanted:
                        out[name] = results[t][f"{metric},none"]
                        ci[name] = accuracy_interval(results[t], metric)
                        docs[name] = results[t].get(f"{metric}_per_doc")
        if "copy" in wanted:
            out["copy"] = copy_probe(m, span_len=min(copy_span, max_length // 2),
                                     num=min(copy_num, limit) if limit else copy_num,
                                     vocab_size=min(len(tokenizer), m.config.vocab_size), seed=seed)
        return out, {t: c for t, c in ci.items() if c is not None}

    model_scores, model_ci = scores_of(model)
    baseline_ci = None
    change_ci: dict[str, list[float]] = {}
    if baseline is not None:
        from .agreement import agreement_scores

        if baseline_scores is not None:
            baseline_scores = dict(baseline_scores)
            change_ci = paired_changes(per_doc.get(id(model), {}), baseline_per_doc or {})
        else:
            baseline_scores, baseline_ci = scores_of(baseline)
            change_ci = paired_changes(per_doc.get(id(model), {}), per_doc.get(id(baseline), {}))
        if any(t in wanted and t not in skipped for t in AGREEMENT_TASKS):
            rows = read_rows(tasks_dir / "agreement.jsonl")  # the limit caps every task's examples
            agreement = agreement_scores(model, baseline, tokenizer, rows, greedy_tokens, batch_size, limit)
            model_scores.update({t: v for t, v in agreement.items() if t in wanted})
            baseline_scores.update({t: SELF_AGREEMENT[t] for t in agreement if t in wanted})
    order = {t: i for i, t in enumerate(available)}
    ordered = lambda d: dict(sorted(d.items(), key=lambda kv: order[kv[0]]))  # noqa: E731
    return {"model": ordered(model_scores), "baseline": ordered(baseline_scores) if baseline is not None else None,
            "model_ci95": model_ci, "baseline_ci95": baseline_ci, "change_ci95": change_ci,
            "model_per_doc": per_doc.get(id(model), {}), "skipped": skipped,
            "seconds": time.perf_counter() - start}


def check_baseline_tokenizer(tokenizer, baseline, baseline_tokenizer=None) -> None:
    """A CompressError unless the baseline's tokenizer (`baseline_tokenizer`, or the one in the folder compress.load
    read `baseline` from) gives the tokens `tokenizer` cuts the same ids (compress.models.tokenizer_difference): the
    suite feeds both models one tokenization, and a reordered vocabulary of the same size would be scored silently
    on the wrong ids. A baseline without tokenizer files (or not loaded by compress.load, and none given) is taken to
    read the model's ids, as `compress eval` takes it: there is nothing to compare."""
    from ..models import resolve_model_path, saved_tokenizer_difference, tokenizer_difference

    source = getattr(baseline, "compress_source", None) if baseline_tokenizer is None else None
    if source:
        try:
            resolve_model_path(source)
        except CompressError:  # the folder is gone since the load: nothing to compare
            source = None
    if baseline_tokenizer is not None:
        difference = tokenizer_difference(tokenizer, baseline_tokenizer)
    else:
        difference = saved_tokenizer_difference(tokenizer, source) if source else None
    if difference:
        raise CompressError(f"the baseline has another tokenizer than the model: {difference}; the suite scores both "
                            "on the same token ids: compare against the model it was made from")


def paired_changes(ours: dict[str, dict | None], base: dict[str, dict | None]) -> dict[str, list[float]]:
    """{task: 95% interval of our accuracy minus the baseline's}, paired over the documents both scored
    (compress.intervals.paired_proportion_difference): the same items, so what the two models agree on cancels."""
    from ..intervals import paired_proportion_difference

    out = {}
    for task, docs in ours.items():
        other = base.get(task)
        common = sorted(set(docs or {}) & set(other or {}))
        if common:
            out[task] = paired_proportion_difference([docs[d] > 0.5 for d in common], [other[d] > 0.5 for d in common])
    return out


def accuracy_interval(result: dict, metric: str = "acc") -> list[float] | None:
    """A 95% Wilson score interval for an lm-eval task's accuracy (`metric`: acc or acc_norm) over its n examples
    (compress.intervals): from the accuracy and n alone, and not zero-width at 0 or 1 (0 of 20 is consistent with up
    to ~16%)."""
    from ..intervals import wilson_interval

    acc, n = result.get(f"{metric},none"), result.get("sample_len", result.get("samples"))
    if not isinstance(acc, (int, float)) or not isinstance(n, int) or n < 1:
        return None
    return wilson_interval(acc, n)


def suite_protocol(tasks_dir: Path, limit: int | None, models=()) -> str:
    cached = [m.kv_cache_settings.residual_length for m in models if getattr(m, "kv_cache_settings", None)]
    return (f"suite {tasks_dir.name if tasks_dir != DATA_DIR else 'kick'}: fixtures in {tasks_dir}"
            + (f", at most {limit} examples per task" if limit else "") + "; scored on the continuation only"
            + (f"; a compressed KV cache read as served (text fed through it in chunks of {cached[0]})"
               if cached else ""))

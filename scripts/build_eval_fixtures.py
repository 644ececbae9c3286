"""Build the evaluation suite's fixtures (JSON lines) and lm-eval task configs (YAML) from held-out text.

    python scripts/build_eval_fixtures.py                       # rebuilds the shipped compress/eval/data/
    python scripts/build_eval_fixtures.py --out DIR --num 200 --passkey-lengths 1024,4096,16384
                                                                # a bigger suite: compress eval ... --suite-dir DIR

Everything is cut from the built-in reference model's held-out documentation (documents it never saw) with fixed
seeds, and lengths are counted in builtin:tiny's tokens, so a rebuild writes the same bytes. Tasks:
- passkey_<L>: the pass-key prompt of compress.eval.probes (same wording, same prompt builder) at ~L tokens;
  the answer is the key's digits.
- cloze_open / cloze_closed: a prose paragraph, then a cue (the words just before a span of that paragraph); the
  answer is the span. Open book: the paragraph shown is the one holding the span. Closed book: another paragraph of
  about the same length (the span is not in the context), so the two differ only in where the answer can come from.
- mc: the start of a paragraph and four candidate continuations (the true one, three from other paragraphs).
- agreement: held-out prefixes and their true continuations, for KL / top-1 / greedy agreement with a baseline.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "compress" / "eval" / "data"
HELDOUT = ROOT / "compress" / "builtin" / "tiny" / "heldout.txt"
SEED = 1234
CUE_WORDS, SPAN_WORDS = 12, 3
MC_CONTEXT_WORDS, MC_OPTION_WORDS, MC_OPTIONS = 24, 8, 4
AGREEMENT_PREFIX, AGREEMENT_CONTINUATION = 96, 32  # tokens


def prose_paragraphs(text: str, min_words: int = 40) -> list[list[str]]:
    """Paragraphs of running prose (no directives, lists, tables, titles or code), as word lists."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in para.strip().splitlines()]
        if not lines or any(line.startswith(("..", ">>>", "*", "-", "=", "|", "+", ":")) for line in lines):
            continue
        if any(set(line) <= set("=-~^*#") for line in lines):
            continue
        words = " ".join(lines).split()
        if len(words) >= min_words and sum(w.isalpha() for w in words) / len(words) > 0.7:
            out.append(words)
    return out


def cloze_rows(paragraphs: list[list[str]], num: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    chosen = rng.sample(range(len(paragraphs)), min(num, len(paragraphs)))
    open_rows, closed_rows = [], []
    for i in chosen:
        words = paragraphs[i]
        cut = rng.randrange(CUE_WORDS + 8, len(words) - SPAN_WORDS + 1)
        cue = " ".join(words[cut - CUE_WORDS:cut])
        answer = " ".join(words[cut:cut + SPAN_WORDS])
        # Closed book: the other paragraph closest in length, so contexts match in size.
        other = min((j for j in range(len(paragraphs)) if j != i),
                    key=lambda j: (abs(len(paragraphs[j]) - len(words)), j))
        open_rows.append({"context": " ".join(words) + "\n\n" + cue, "answer": answer})
        closed_rows.append({"context": " ".join(paragraphs[other]) + "\n\n" + cue, "answer": answer})
    return open_rows, closed_rows


def mc_rows(paragraphs: list[list[str]], num: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in rng.sample(range(len(paragraphs)), min(num, len(paragraphs))):
        words = paragraphs[i]
        start = rng.randrange(0, len(words) - MC_CONTEXT_WORDS - MC_OPTION_WORDS + 1)
        context = " ".join(words[start:start + MC_CONTEXT_WORDS])
        true = " ".join(words[start + MC_CONTEXT_WORDS:start + MC_CONTEXT_WORDS + MC_OPTION_WORDS])
        options = [true]
        for j in rng.sample([j for j in range(len(paragraphs)) if j != i], MC_OPTIONS - 1):
            w = paragraphs[j]
            s = rng.randrange(0, len(w) - MC_OPTION_WORDS + 1)
            options.append(" ".join(w[s:s + MC_OPTION_WORDS]))
        rng.shuffle(options)
        rows.append({"context": context, "choices": options, "label": options.index(true)})
    return rows


def passkey_rows(tokenizer, text: str, length: int, num: int) -> list[dict]:
    from compress.eval.probes import passkey_prompts

    rows = []
    for prompt, answer in passkey_prompts(tokenizer, text, length, num, seed=SEED + length):
        context = tokenizer.decode(prompt, clean_up_tokenization_spaces=False)
        key = tokenizer.decode(answer, clean_up_tokenization_spaces=False).strip().rstrip(".")
        rows.append({"context": context, "answer": key})
    return rows


def agreement_rows(tokenizer, text: str, num: int, rng: random.Random) -> list[dict]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    span = AGREEMENT_PREFIX + AGREEMENT_CONTINUATION
    candidates = range(0, len(ids) - span, span)
    if num > len(candidates):
        from compress.errors import CompressError

        raise CompressError(f"--agreement-num {num}: the held-out text holds {len(candidates)} spans of {span} "
                            f"tokens; use at most {len(candidates)}")
    starts = sorted(rng.sample(candidates, num))
    decode = lambda t: tokenizer.decode(t, clean_up_tokenization_spaces=False)  # noqa: E731
    return [{"context": decode(ids[s:s + AGREEMENT_PREFIX]), "continuation": decode(ids[s + AGREEMENT_PREFIX:s + span])}
            for s in starts]


LOGLIKELIHOOD_YAML = """\
task: kick_{name}
tag: kick
custom_dataset: !function compress.eval.lm_eval_tasks.load_fixture
dataset_kwargs:
  fixture: {name}.jsonl
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{context}}}}"
# the space is part of the target: lm-eval 0.4.x does not put target_delimiter before a loglikelihood continuation
doc_to_target: " {{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  description: "{description}"
"""

MC_YAML = """\
task: kick_mc
tag: kick
custom_dataset: !function compress.eval.lm_eval_tasks.load_fixture
dataset_kwargs:
  fixture: mc.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  description: "true continuation of a paragraph among 4: log-likelihood summed (acc), per character (acc_norm)"
"""


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def build(out: Path, num: int = 24, passkey_lengths: tuple[int, ...] = (256, 512, 1000, 2000), passkey_num: int = 16,
          agreement_num: int = 16) -> list[str]:
    """Write every fixture and task config under `out`; returns the task names (lm-eval names, `kick_` prefix)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(HELDOUT.parent)
    text = HELDOUT.read_text(encoding="utf-8")
    paragraphs = prose_paragraphs(text)
    agreement = agreement_rows(tokenizer, text, agreement_num, random.Random(SEED + 2))  # (refused before writing)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[list[dict], str]] = {}
    for length in passkey_lengths:
        files[f"passkey_{length}"] = (passkey_rows(tokenizer, text, length, passkey_num),
                                      f"pass key buried in ~{length} tokens of held-out text; greedy digits exact")
    open_rows, closed_rows = cloze_rows(paragraphs, num, random.Random(SEED))
    files["cloze_open"] = (open_rows, f"paragraph, then the {CUE_WORDS} words before a {SPAN_WORDS}-word span of it; "
                                      "greedy span exact")
    files["cloze_closed"] = (closed_rows, "as cloze_open, but the paragraph shown is another one (span not in "
                                          "context)")
    for name, (rows, description) in files.items():
        write_jsonl(out / f"{name}.jsonl", rows)
        (out / f"{name}.yaml").write_text(LOGLIKELIHOOD_YAML.format(name=name, description=description))
    write_jsonl(out / "mc.jsonl", mc_rows(paragraphs, num, random.Random(SEED + 1)))
    (out / "mc.yaml").write_text(MC_YAML)
    write_jsonl(out / "agreement.jsonl", agreement)
    return [f"kick_{n}" for n in files] + ["kick_mc"]


MIN_PASSKEY_LENGTH = 64  # the needle and the question take ~35 tokens; the rest is filler


def main(argv: list[str] | None = None) -> int:
    from compress.bench_args import int_list, positive_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the shipped fixtures)")
    ap.add_argument("--num", type=positive_int, default=24, help="examples per cloze / multiple-choice task")
    ap.add_argument("--passkey-lengths", type=int_list(MIN_PASSKEY_LENGTH), default=(256, 512, 1000, 2000),
                    help=f"comma-separated prompt lengths in tokens, each at least {MIN_PASSKEY_LENGTH}")
    ap.add_argument("--passkey-num", type=positive_int, default=16, help="prompts per pass-key length")
    ap.add_argument("--agreement-num", type=positive_int, default=16, help="prefixes for the agreement metrics")
    args = ap.parse_args(argv)
    folder = next((f for f in (args.out, *args.out.parents) if f.exists()), None)
    if folder is not None and not folder.is_dir():
        ap.error(f"--out {args.out}: {folder} is a file, not a folder")
    tasks = build(args.out, args.num, args.passkey_lengths, args.passkey_num, args.agreement_num)
    print(f"wrote {len(tasks)} tasks + agreement.jsonl to {args.out}: {', '.join(tasks)}")
    return 0


if __name__ == "__main__":
    from compress.bench_args import run_cli

    run_cli(main)

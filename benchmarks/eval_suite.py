"""The evaluation suite (compress/eval/) on the built-in reference model: the original, Wanda 2:4, and 50% and 70%
magnitude pruning, in one process (the original is scored once and is every model's baseline).

    python benchmarks/eval_suite.py [--model builtin:small] [--limit N] [--windows 16] [--json]

Columns: held-out perplexity (--windows x 256 tokens) and every suite task; a compressed model's lm-eval scores carry
their change from the original with a 95% interval paired over the same documents. Pruning uses the shipped recipes'
settings: recipes/wanda-2of4.yaml (calibrated), and magnitude at 50% and 70% unstructured."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from compress.bench_args import run_cli, positive_int  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def variants(source: str, tokenizer):
    import compress

    def load():  # fp32: builtin:small is stored in bf16, which the CPU computes ~13x slower
        return compress.load(source, dtype="float32")

    yield "original", load()
    recipe = compress.Recipe.from_yaml(ROOT / "recipes" / "wanda-2of4.yaml")
    yield "wanda 2:4", compress.apply(load(), recipe, tokenizer=tokenizer, progress=False)[0]
    for sparsity in (0.5, 0.7):
        prune = compress.passes.Prune(method="magnitude", sparsity=sparsity)
        yield f"magnitude {sparsity:.0%}", compress.apply(load(), [prune], progress=False)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:small")
    ap.add_argument("--limit", type=positive_int, default=None, help="examples per lm-eval task (default: all)")
    ap.add_argument("--windows", type=positive_int, default=16, help="held-out windows of 256 tokens for perplexity")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import compress
    from compress.eval.suite import SELF_AGREEMENT, run_suite
    from compress.evaluate import evaluate, heldout_windows

    tokenizer = compress.load_tokenizer(args.model)
    windows = heldout_windows(tokenizer, seq_len=256, max_windows=args.windows)
    rows, baseline, baseline_scores, baseline_docs = {}, None, None, None
    for name, model in variants(args.model, tokenizer):
        start = time.perf_counter()
        if baseline is None:  # the original: scored once; its agreement with itself is checked by tests/eval
            baseline = model
            out = run_suite(model, tokenizer, limit=args.limit)
            baseline_scores, baseline_docs = dict(out["model"]), out["model_per_doc"]
            out["model"] = {**SELF_AGREEMENT, **out["model"]}
            out["skipped"] = {k: v for k, v in out["skipped"].items() if k not in SELF_AGREEMENT}
        else:
            out = run_suite(model, tokenizer, baseline, limit=args.limit, baseline_scores=baseline_scores,
                            baseline_per_doc=baseline_docs)
        quality = evaluate(model, windows, baseline, progress=False)
        rows[name] = {"perplexity": quality["perplexity"], **out["model"], "skipped": out["skipped"],
                      "change_ci95": out["change_ci95"], "seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: done in {rows[name]['seconds']} s", file=sys.stderr)
    if args.json:
        print(json.dumps({"model": args.model, "limit": args.limit, "windows": args.windows, "rows": rows}))
        return 0
    names = list(rows)
    tasks = [k for k in rows[names[0]] if k not in ("skipped", "seconds", "change_ci95")]

    def cell(row: dict, task: str) -> str:
        if task not in row:
            return "-"
        ci = row["change_ci95"].get(task)  # the change from the original, paired over the same documents
        change = f" ({row[task] - rows[names[0]][task]:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}])" if ci else ""
        return f"{row[task]:.4f}{change}"

    print(f"| task ({args.model}) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for task in tasks:
        print(f"| {task} | " + " | ".join(cell(rows[n], task) for n in names) + " |")
    print("| seconds (suite + perplexity) | " + " | ".join(str(rows[n]["seconds"]) for n in names) + " |")
    return 0


if __name__ == "__main__":
    run_cli(main)

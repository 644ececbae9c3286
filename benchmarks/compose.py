"""Every shipped recipe on the reference model, in one table: to choose a recipe (or a composition of passes).

For each recipe in recipes/ (or those named with --recipes), `compress apply RECIPE --json` runs in its own process
(same model, calibration and held-out text for all), and its JSON gives: checkpoint bytes vs the original's,
held-out perplexity, KL(baseline || model) and top-1 agreement against the uncompressed model, the same with the
compressed KV cache for recipes that set one, and the seconds its passes took (time to apply; loading and
evaluation excluded). `--suite` adds `compress eval --suite kick` scores (retrieval, copy, cloze, multiple choice:
what perplexity hides) and their mean ratio to the baseline's.

    python benchmarks/compose.py [--model builtin:small] [--recipes a.yaml b.yaml] [--windows 8] [--suite --suite-limit 20] [--json]

Times are this machine's wall seconds (noisy when shared): read them as relative costs between recipes."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from compress.bench_args import run_cli, positive_int  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def run_json(args: list[str]) -> dict:
    # in the user's folder, as `compress apply` run by hand: a recipe's relative paths mean the same here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "compress.cli", *args, "--json"], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(recipe: Path, out: Path, windows: int, suite: bool, suite_limit: int | None,
            model: str | None = None) -> dict:
    start = time.perf_counter()
    result = run_json(["apply", str(recipe), "--output", str(out), "--eval-windows", str(windows),
                       *(["--model", model] if model else [])])
    row = {"recipe": recipe.name, "model": model or "(the recipe's)", "wall_seconds": round(time.perf_counter() - start, 1)}
    if "error" in result:
        return {**row, **result}
    ev = result.get("eval", {})
    row.update(
        passes=[p["name"] for p in result["passes"]],
        apply_seconds=round(sum(p["seconds"] for p in result["passes"]), 1),
        checkpoint_bytes=result["checkpoint_bytes"], original_bytes=result["original_checkpoint_bytes"],
        ratio=round(result["checkpoint_bytes"] / result["original_checkpoint_bytes"], 4),
        perplexity=ev.get("perplexity"), baseline_perplexity=ev.get("baseline_perplexity"),
        ppl_delta_pct=ev.get("ppl_delta_pct"), ppl_delta_pct_ci95=ev.get("ppl_delta_pct_ci95"),
        kl=ev.get("kl"), top1=ev.get("top1_agreement"), protocol=ev.get("protocol"),
    )
    if "kv_cache" in ev:
        row["kv_cache"] = {k: ev["kv_cache"][k] for k in ("ppl", "ppl_reference", "kl", "top1_agreement")}
    if suite:
        args = ["eval", str(out), "--no-speed", "--suite", "kick", "--max-windows", "1"]
        scores = run_json(args + (["--suite-limit", str(suite_limit)] if suite_limit else []))
        if "error" in scores:
            row["suite_error"] = scores["error"]
        else:
            row["suite"], row["suite_baseline"] = scores.get("suite"), scores.get("suite_baseline")
    return row


def suite_ratio(row: dict) -> str:
    from compress.eval.suite import LOWER_IS_BETTER

    model, base = row.get("suite") or {}, row.get("suite_baseline") or {}
    ratios = [model[t] / base[t] for t in model if base.get(t) and t not in LOWER_IS_BETTER]
    return f"{sum(ratios) / len(ratios):.3f}" if ratios else "-"


def print_table(rows: list[dict], suite: bool, model: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from compress.intervals import format_interval

    table = Table(title=f"every recipe on {model} (bytes: safetensors on disk; quality vs the uncompressed model)")
    cols = ["recipe", "passes", "checkpoint", "vs dense", "perplexity", "change [95% CI]", "KL", "top-1",
            "KV-cache KL", "apply s"]
    if suite:
        cols.append("suite / baseline")
    for c in cols:
        table.add_column(c, justify="left" if c in ("recipe", "passes") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["recipe"], "failed: " + r["error"][:80], *[""] * (len(cols) - 2))
            continue
        kv = r.get("kv_cache")
        cells = [r["recipe"], " + ".join(r["passes"]), f"{r['checkpoint_bytes'] / 1e6:.2f} MB", f"{r['ratio']:.3f}x",
                 f"{r['baseline_perplexity']:.3f} -> {r['perplexity']:.3f}",
                 f"{r['ppl_delta_pct']:+.2f}% {format_interval(r['ppl_delta_pct_ci95'], '+.2f')}",
                 f"{r['kl']:.4f}", f"{r['top1']:.3f}",
                 f"{kv['kl']:.4f}" if kv else "-", f"{r['apply_seconds']:.1f}"]
        if suite:
            cells.append(suite_ratio(r) if "suite" in r else r.get("suite_error", "-")[:40])
        table.add_row(*cells)
    Console(width=200).print(table)
    if rows and rows[0].get("protocol"):
        print(f"held-out protocol: {rows[0]['protocol']}; KV-cache KL: the compressed cache vs the uncompressed one "
              "(the model's dtype), chunked decoding")


def main(argv=None) -> int | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", type=Path, help="recipe files (default: every recipes/*.yaml)")
    parser.add_argument("--model", default=None, help="run every recipe on this model (default: the model each "
                        "recipe names: builtin:tiny, or builtin:small for the *-small recipes)")
    parser.add_argument("--windows", type=positive_int, default=8, help="held-out windows of 256 tokens per evaluation")
    parser.add_argument("--suite", action="store_true", help="also score the kick suite (slower)")
    parser.add_argument("--suite-limit", type=positive_int, default=None, help="examples per suite task")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    args = parser.parse_args(argv)
    recipes = args.recipes or sorted(RECIPES.glob("*.yaml"))
    missing = [str(r) for r in recipes if not r.is_file()]
    if missing:
        parser.error(f"--recipes: no such file: {', '.join(missing)}")
    if args.model is not None:
        from compress.models import resolve_model_path

        path = resolve_model_path(args.model)  # a missing model: one line, exit 2, before 22 failing runs
        if not args.model.startswith("builtin:"):
            args.model = str(path.resolve())  # absolute: each run gets it as given, whatever its folder
    recipes = [r.resolve() for r in recipes]
    rows = []
    with tempfile.TemporaryDirectory(prefix="compose-bench-") as tmp:
        for i, recipe in enumerate(recipes, 1):
            print(f"[{i}/{len(recipes)}] {recipe.name}", file=sys.stderr, flush=True)
            rows.append(measure(recipe, Path(tmp) / recipe.stem, args.windows, args.suite, args.suite_limit,
                                args.model))
    if args.json:
        print(json.dumps(rows))
    else:
        print_table(rows, args.suite, args.model or "the recipes' models")
    if rows and all(r.get("error") for r in rows):
        return 1  # nothing measured


if __name__ == "__main__":
    run_cli(main)

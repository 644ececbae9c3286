"""`compress eval --suite`: run the suite for the CLI, print its table, write its plot."""
from __future__ import annotations

from ..errors import CompressError


def check_suite_options(suite: str | None, suite_dir: str | None, plot_file: str | None,
                        suite_limit: int | None = None) -> None:
    """Everything that can fail before any model loads."""
    from .lm_eval_tasks import require_lm_eval
    from .plot import check_plot_target
    from .suite import check_suite_folder, suite_dir as resolve

    if plot_file and not (suite or suite_dir):
        raise CompressError("--plot draws the suite's scores: add --suite kick")
    if suite_limit is not None and not (suite or suite_dir):
        raise CompressError("--suite-limit limits the suite's examples: add --suite kick")
    if suite or suite_dir:
        check_suite_folder(resolve(suite, suite_dir))  # every task file and row read now, not after the models load
        require_lm_eval()
    if plot_file:
        check_plot_target(plot_file)


def suite_result(model, tokenizer, baseline, suite: str | None, suite_dir: str | None, limit: int | None,
                 plot_file: str | None, model_label: str, baseline_label: str | None) -> dict:
    """The keys `compress eval --json` adds: suite (task -> score), suite_baseline, suite_skipped, suite_protocol."""
    from .suite import run_suite, suite_dir as resolve, suite_protocol

    tasks_dir = resolve(suite, suite_dir)
    scores = run_suite(model, tokenizer, baseline, tasks_dir=tasks_dir, limit=limit)
    out = {"suite": scores["model"], "suite_baseline": scores["baseline"], "suite_ci95": scores["model_ci95"],
           "suite_baseline_ci95": scores["baseline_ci95"],
           "suite_change_ci95": scores["change_ci95"], "suite_skipped": scores["skipped"],
           "suite_protocol": suite_protocol(tasks_dir, limit, (model, baseline)),
           "suite_seconds": round(scores["seconds"], 1)}
    if plot_file:
        from .plot import plot_suite

        out["suite_plot"] = str(plot_suite(scores["model"], scores["baseline"], plot_file, model_label,
                                           baseline_label or "baseline"))
    return out


SUITE_COLUMNS = ["task", "baseline", "model", "model 95% CI", "model - baseline (paired 95% CI)", "model / baseline"]


def suite_table_rows(result: dict) -> list[list[str]]:
    """Rows of SUITE_COLUMNS; skipped tasks say why."""
    from ..intervals import format_interval
    from .suite import LOWER_IS_BETTER

    base, ci = result.get("suite_baseline") or {}, result.get("suite_ci95") or {}
    change = result.get("suite_change_ci95") or {}
    rows = []
    for task, score in result["suite"].items():
        b = base.get(task)
        ratio = "-" if b in (None, 0) or task in LOWER_IS_BETTER else f"{score / b:.2f}"
        name = f"{task} (lower is better)" if task in LOWER_IS_BETTER else task
        rows.append([name, "-" if b is None else f"{b:.4f}", f"{score:.4f}",
                     format_interval(ci[task], ".3f") if task in ci else "-",
                     f"{score - b:+.3f} {format_interval(change[task], '+.3f')}" if task in change else "-", ratio])
    rows += [[task, "skipped", reason, "", "", ""] for task, reason in result.get("suite_skipped", {}).items()]
    return rows

"""A PNG of each suite score against the baseline (matplotlib, the `plot` extra)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import CompressError
from .suite import LOWER_IS_BETTER


def check_plot_target(path: str | Path) -> Path:
    """Fail before any evaluation runs: matplotlib missing, not a .png name, or a place the PNG cannot be written
    (its folder missing, a file, or not writable: no folder is created that the user did not ask for)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError as exc:
        raise CompressError("--plot needs matplotlib: pip install 'compress[plot]' (or pip install matplotlib)") from exc
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise CompressError(f"--plot {path}: give a file name ending in .png")
    from ..output_folder import file_target_problem

    problem = file_target_problem(path)
    if problem:
        raise CompressError(f"--plot {problem}; give a .png path in an existing folder you can write")
    return path


def plot_suite(model_scores: dict[str, float], baseline_scores: dict[str, float] | None, path: str | Path,
               model_label: str = "model", baseline_label: str = "baseline") -> Path:
    """Grouped horizontal bars per task (baseline and model); tasks where lower is better are marked."""
    path = check_plot_target(path)
    # the labels are the user's model names: a `$` in one is text, not the start of matplotlib's math
    model_label, baseline_label = (label.replace("$", r"\$") for label in (model_label, baseline_label))
    import matplotlib.pyplot as plt

    tasks = list(model_scores)
    labels = [f"{t} (lower is better)" if t in LOWER_IS_BETTER else t for t in tasks]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(tasks) + 1.2))
    y = range(len(tasks))
    height = 0.38
    if baseline_scores:
        ax.barh([i - height / 2 for i in y], [baseline_scores.get(t, 0.0) for t in tasks], height,
                label=baseline_label, color="#9aa5b1")
    ax.barh([i + height / 2 for i in y], [model_scores[t] for t in tasks], height, label=model_label,
            color="#d9480f")
    for i, t in enumerate(tasks):
        ax.text(model_scores[t], i + height / 2, f" {model_scores[t]:.3f}", va="center", fontsize=7)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("score")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("evaluation suite: model vs baseline", fontsize=10)
    fig.tight_layout()
    # written next to its place, then renamed: a failed write leaves no half-written PNG at the user's path
    import tempfile

    from ..paths import with_usual_mode

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(tmp)
    try:
        with_usual_mode(tmp)
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path

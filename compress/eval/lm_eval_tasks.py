"""The suite's lm-eval side: our fixtures as local task configs, our loaded model behind lm-eval's HF wrapper.

The YAML task files in compress/eval/data/ (written by scripts/build_eval_fixtures.py) name `load_fixture` as
their dataset, so lm-eval reads the JSON lines next to them and never touches the hub. Any other lm-eval task (a
standard benchmark, for users with internet) runs on a compressed checkpoint the same way: `lm_eval_results(model,
tokenizer, ["hellaswag"], tasks_dir=None)`."""
from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
from pathlib import Path

from ..errors import CompressError

DATA_DIR = Path(__file__).parent / "data"


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise CompressError("the evaluation suite runs on lm-eval: pip install 'compress[eval]' "
                            "(or pip install lm_eval)") from exc


def load_fixture(fixture: str, fixtures_dir: str | None = None, **_):
    """lm-eval `custom_dataset`: a JSON-lines fixture as a DatasetDict with one `test` split."""
    import datasets

    path = Path(fixtures_dir or DATA_DIR) / fixture
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def suite_task_names(tasks_dir: Path, metric: str | None = None) -> list[str]:
    """The lm-eval task names defined by the YAML files of a suite folder (those whose metric_list names `metric`,
    if given)."""
    names = []
    # (a block list item `- metric: NAME`, its value quoted or not)
    listed = re.compile(rf"""\s*-\s*metric:\s*(["']?){re.escape(metric or '')}\1\s*(#.*)?""")
    for path in sorted(Path(tasks_dir).glob("*.yaml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        if metric is None or any(listed.fullmatch(line) for line in lines):
            names += [line.split(":", 1)[1].split(" #")[0].strip().strip("\"'") for line in lines
                      if line.startswith("task:")]  # (quoted, or with a comment after it)
    return names


def wrap_model(model, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """lm-eval's HFLM around an already loaded (compressed) model; nothing is reloaded or moved."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # it warns about being handed a model object
    if getattr(model, "kv_cache_settings", None) is None:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)

    class ThroughCompressedCache(HFLM):
        """lm-eval's log-likelihoods read through the model's compressed KV cache (a plain forward never reads it):
        its rows are right-padded, so a token's compressed past holds no padding."""

        def _model_call(self, inps, attn_mask=None, labels=None):
            from ..evaluate import logits_as_served

            return logits_as_served(self.model, inps)

    return ThroughCompressedCache(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def lm_eval_results(lm, tasks: list[str], tasks_dir: Path | None = DATA_DIR, limit: int | None = None,
                    seed: int = 0) -> dict[str, dict]:
    """Run lm-eval `tasks` on a wrapped model; {task: {metric: value}} (lm-eval's `results` section), each task's
    with "acc_per_doc": {doc_id: acc} where its samples score acc (what paired comparisons of two models use), and
    "acc_norm_per_doc" likewise where they score acc_norm.
    `tasks_dir=None` uses lm-eval's own task registry (standard benchmarks; they download their data)."""
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    if tasks_dir is not None:
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False,
                              metadata={"fixtures_dir": str(tasks_dir)})
    else:
        manager = TaskManager()
    with _lean_run_metadata():
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      # no resampling (1 would fork a pool and divide by zero for metrics lm-eval
                                      # bootstraps); the suite's accuracy intervals come from acc and n (suite.py)
                                      bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    results = out["results"]
    for task, samples in (out.get("samples") or {}).items():
        for metric in ("acc", "acc_norm"):
            if task in results and samples and all(metric in s for s in samples):
                results[task][f"{metric}_per_doc"] = {s["doc_id"]: float(s[metric]) for s in samples}
    return results


@contextlib.contextmanager
def _lean_run_metadata():
    """Three things lm-eval does for its own run record or display, which the suite does not need:
    - it records the current folder's git commit by running `git describe`, whose stderr reaches the user as
      'fatal: not a git repository' outside a repository: the same query, its stderr dropped;
    - `add_env_info` runs torch's collect_env (`pip list` and ten other subprocesses): 1.7 s of every 2.6 s
      suite call on a 12-question task here. Skipped: the suite's own protocol line says what ran;
    - a progress bar per task while it builds the task's requests (a dozen, each done at once, on stderr): dropped;
      the bar of the requests themselves (the suite's long step) stays."""
    import lm_eval.api.task as task_module
    import lm_eval.evaluator as evaluator

    def commit_hash():
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, OSError):  # not a repository; no git
            return None

    replacements = {"get_git_commit_hash": commit_hash, "add_env_info": lambda storage: None}
    # another lm-eval version without these names: leave it as it is
    saved = {name: getattr(evaluator, name) for name in replacements if hasattr(evaluator, name)}
    for name in saved:
        setattr(evaluator, name, replacements[name])
    bar = getattr(task_module, "tqdm", None)
    if bar is not None:
        task_module.tqdm = lambda items, *args, **kwargs: items
    try:
        yield
    finally:
        if bar is not None:
            task_module.tqdm = bar
        for name, value in saved.items():
            setattr(evaluator, name, value)

"""The suite's lm-eval side: our fixtures as local task configs, our loaded model behind lm-eval's HF wrapper.

The YAML task files in compress/eval/data/ (written by scripts/build_eval_fixtures.py) name `load_fixture` as
their dataset, so lm-eval reads the JSON lines next to them and never touches the hub. Any other lm-eval task (a
standard benchmark, for users with internet; its data is then cached) runs on a compressed checkpoint the same way:
`lm_eval_results(wrap_model(model, tokenizer), ["hellaswag"], tasks_dir=None)`."""
from __future__ import annotations

import contextlib
import json
import logging
import subprocess
from pathlib import Path

import yaml

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


LM_EVAL_PREFIX = "kick_"  # every suite task's lm-eval name: kick_<short name>
FIXTURE_LOADER = "compress.eval.lm_eval_tasks.load_fixture"


class _ConfigLoader(yaml.SafeLoader):
    """lm-eval's task YAML read as data: `!function a.b.c` is the string a.b.c (nothing is imported)."""


_ConfigLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def task_configs(tasks_dir: Path) -> dict[str, tuple[Path, dict]]:
    """{lm-eval task name: (its YAML file, its config)} of a suite folder, each checked to be a suite task:
    named kick_<name>, reading `dataset_kwargs.fixture` (a file of the folder) through load_fixture.
    A CompressError names the file otherwise."""
    configs: dict[str, tuple[Path, dict]] = {}
    for path in sorted(Path(tasks_dir).glob("*.yaml")):
        try:
            config = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader)
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise CompressError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
        task = config.get("task") if isinstance(config, dict) else None
        if not isinstance(task, str) or not task.startswith(LM_EVAL_PREFIX) or task == LM_EVAL_PREFIX:
            raise CompressError(f"{path}: `task:` must name the task {LM_EVAL_PREFIX}<name> (found {task!r}); a "
                                "suite folder's YAML files are written by scripts/build_eval_fixtures.py")
        if task in configs:
            raise CompressError(f"{path}: task {task} is defined in {configs[task][0].name} too")
        fixture = (config.get("dataset_kwargs") or {}).get("fixture") if isinstance(
            config.get("dataset_kwargs") or {}, dict) else None
        if config.get("custom_dataset") != FIXTURE_LOADER or not isinstance(fixture, str) or not fixture:
            raise CompressError(f"{path}: a suite task reads its rows with `custom_dataset: !function "
                                f"{FIXTURE_LOADER}` and `dataset_kwargs: {{fixture: NAME.jsonl}}`")
        if not (Path(tasks_dir) / fixture).is_file():
            raise CompressError(f"{path}: its fixture {fixture} is not a file of {tasks_dir}")
        configs[task] = (path, config)
    return configs


def suite_task_names(tasks_dir: Path, metric: str | None = None) -> list[str]:
    """The lm-eval task names defined by the YAML files of a suite folder (those whose metric_list names `metric`,
    if given)."""
    return [task for task, (_, config) in task_configs(tasks_dir).items()
            if metric is None or any(isinstance(m, dict) and m.get("metric") == metric
                                     for m in config.get("metric_list") or [])]


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
    `tasks_dir=None` uses lm-eval's own task registry (standard benchmarks; they download their data). An unknown
    task, or a dataset the hub cannot give (offline, not cached), is a CompressError naming the task."""
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    if tasks_dir is not None:
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False,
                              metadata={"fixtures_dir": str(tasks_dir)})
    else:
        manager = TaskManager()
    check_task_names(tasks, manager.all_tasks, tasks_dir)
    try:
        with _lean_run_metadata():
            out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                          # no resampling (1 would fork a pool and divide by zero for metrics lm-eval
                                          # bootstraps); the suite's accuracy intervals come from acc and n (suite.py)
                                          bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    except ConnectionError as exc:  # a task whose dataset is on the hub, offline and not cached
        raise CompressError(unreachable_message(tasks, manager, exc)) from None
    results = out["results"]
    for task, samples in (out.get("samples") or {}).items():
        for metric in ("acc", "acc_norm"):
            if task in results and samples and all(metric in s for s in samples):
                results[task][f"{metric}_per_doc"] = {s["doc_id"]: float(s[metric]) for s in samples}
    return results


def check_task_names(tasks: list, known: list[str], tasks_dir: Path | None) -> None:
    """A CompressError naming the tasks lm-eval does not know (it raised a bare KeyError), with the close ones."""
    import difflib

    unknown = [t for t in tasks if isinstance(t, str) and t not in known
               and not (t.endswith((".yaml", ".yml")) and Path(t).is_file())]  # lm-eval also takes a YAML path
    if not unknown:
        return
    close = list(dict.fromkeys(c for t in unknown for c in difflib.get_close_matches(t, known, n=3, cutoff=0.8)))
    where = f"in {tasks_dir}" if tasks_dir is not None else "in lm-eval's registry"
    listed = (", ".join(sorted(known)) if len(known) <= 20
              else f"{len(known)} tasks, groups and tags (`lm-eval ls tasks` lists them)")
    raise CompressError(f"unknown lm-eval task(s) {', '.join(unknown)} {where}"
                        + (f" (did you mean {', '.join(close)}?)" if close else "") + f"\navailable: {listed}")


def unreachable_message(tasks: list, manager, exc: Exception) -> str:
    """Which task's dataset could not be downloaded (lm-eval's error names the dataset only)."""
    def dataset(task):
        config = getattr(manager.task_index.get(task), "cfg", None) if isinstance(task, str) else None
        return config.get("dataset_path") if isinstance(config, dict) else None

    named = [t for t in tasks if dataset(t) and dataset(t) in str(exc)] or [t for t in tasks if isinstance(t, str)]
    return (f"lm-eval task(s) {', '.join(named)}: the dataset cannot be reached ({' '.join(str(exc).split())}); "
            "run it once online: lm-eval downloads it from the Hugging Face hub, then reads the cache")


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

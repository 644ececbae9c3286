"""The benchmark scripts treat a user's mistake like the CLI does: one line on stderr, exit 2, no traceback."""
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from compress.bench_args import fraction, positive_int, run_cli

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# transformers' log handler keeps the stderr it first sees: let that be pytest's session-long stream (now, at
# collection), not a test's capsys stream that closes after it (later warnings would print "Logging error")
hf_logging.get_logger("transformers")


CASES = [
    ("kv_cache.py", ["--windows", "0"], "argument --windows: 0 must be at least 1"),
    ("kv_cache.py", ["--only", "kivi-2", "gear-4-kk"], "--only gear-4-kk: no such configuration"),  # was dropped
    ("kv_cache.py", ["--compare", "kivi-4"], "expected A:B (two configuration names)"),
    ("kv_cache.py", ["--compare", "kivi-4:kivi-9"], "unknown configuration 'kivi-9'"),
    ("kv_cache.py", ["--compare", "kivi-4:dynamic-fp32"], "is the reference (KL 0)"),
    ("kv_serving.py", ["--shapes", "foo"], "write batch,context,head_dim"),
    ("prune.py", ["--model", "/nonexistent/model"], "error: model /nonexistent/model does not exist"),
    ("compose.py", ["--recipes", "/nonexistent.yaml"], "--recipes: no such file"),
    ("offload_memory.py", ["--max-memory", "bogus"], "cannot read max_memory 'bogus'"),
    # output files are checked before the run, not at its last line (they ended in a traceback after minutes)
    ("kv_cache.py", ["--save-json", "/nonexistent/x.json"], "--save-json: /nonexistent/x.json: /nonexistent is not"),
    ("sparse_speed.py", ["--save-quality", "/"], "--save-quality: / is a folder"),
    ("sparse_speed.py", ["--ppl-budget", "2"], "argument --ppl-budget: 2.0 is a fraction (0.007 = +0.7% perplexity)"),
    ("sparse_speed.py", ["--weight-copies", "-3"], "argument --weight-copies: -3 must be 0 or more"),
    ("long_context_memory.py", ["--context", "0"], "argument --context: 0 must be at least 1"),
    ("vq_logits.py", ["--save", "/nonexistent/v.json"], "--save: /nonexistent/v.json"),
    ("prune.py", ["--save-json", "/nonexistent/p.json"], "--save-json: /nonexistent/p.json"),
    # counts that crashed deep in the run (UnboundLocalError, ZeroDivisionError, StatisticsError)
    ("kv_cache.py", ["--long", "-5"], "argument --long: -5 must be 0 or more"),
    ("linearize.py", ["--seq-len", "1"], "argument --seq-len: 1 must be at least 2"),
    ("offload_memory.py", ["--hidden", "0"], "argument --hidden: 0 must be at least 1"),
    ("vq_logits.py", ["--repeats", "0"], "argument --repeats: 0 must be at least 1"),
    ("kv_sliding_memory.py", ["--tokens", "0"], "argument --tokens: 0 must be at least 1"),
    ("interval_blocks.py", ["builtin:tiny", "builtin:tiny", "--windows", "1"],
     "argument --windows: 1 must be at least 2"),
    # refused at parse time, not a traceback (ValueError, pydantic) after the model loaded
    ("kv_kernels.py", ["--contexts", "95"], "argument --contexts: 95 must be at least 96"),
    ("vq_logits.py", ["--shortlist", "-1"], "argument --shortlist: -1 must be 0 or more"),
    ("vq_logits.py", ["--distill-batch-size", "0"], "argument --distill-batch-size: 0 must be at least 1"),
    ("vq_logits.py", ["--distill-seconds", "-1"], "argument --distill-seconds: -1.0 must be positive"),
    ("kv_cache.py", ["--long", "5", "--only", "bogus"], "--only bogus: no such configuration"),  # before the run
    ("linearize.py", ["--skip-speed", "--skip-quality"], "leaves nothing to measure"),
    ("linearize.py", ["--model", "builtin:tiny", "--seq-len", "2048"],
     "--seq-len 2048: 2048 tokens, longer than builtin:tiny's context (1024 tokens)"),
    ("linearize.py", ["--model", "builtin:tiny", "--passkey-len", "4096"],
     "--passkey-len 4096: 4096 tokens, longer than builtin:tiny's context (1024 tokens)"),
    ("linearize.py", ["--model", "builtin:tiny", "--copy-len", "600"], "--copy-len 600: 1200 tokens, longer than"),
    ("kv_served_logits.py", ["--tokens", "64"], "argument --tokens: 64 must be at least 128"),
    ("pass_memory.py", ["--layers", "0", "-3"], "argument --layers: 0 must be at least 1"),
    ("pass_memory.py", ["--layers", "8", "4"], "--layers 8 4: the first depth must be smaller than the second"),
]
IN_A_PROCESS = CASES[0]  # run as the user runs it (the `__main__` path end to end): a fresh process costs ~10 s


@pytest.mark.parametrize("script,args,fragment", CASES)
def test_bad_arguments_are_one_line_and_exit_2(script, args, fragment, capsys, script_module):
    """One case runs as the user runs it; the others call the script's main(argv) through run_cli in this process,
    the path its `__main__` block takes (test_every_script_runs_main_through_run_cli)."""
    if (script, args, fragment) != IN_A_PROCESS:
        with pytest.raises(SystemExit) as exit_:
            run_cli(script_module(f"benchmarks/{script}").main, list(args))
        code, stderr = exit_.value.code, capsys.readouterr().err
    else:
        proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                              timeout=300)
        code, stderr = proc.returncode, proc.stderr
    assert code == 2, stderr
    assert fragment in stderr and "Traceback" not in stderr, stderr


def test_argument_types():
    import argparse

    assert positive_int("3") == 3 and fraction("0.5") == 0.5
    for bad in ("0", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        fraction("2")


@pytest.mark.parametrize("script", sorted({script for script, _, _ in CASES}))
def test_every_script_runs_main_through_run_cli(script):
    """What the in-process cases rely on: the script's entry point is run_cli(main), which turns a user's mistake
    into one line and exit 2 (a script calling main() directly would print a traceback)."""
    source = (BENCH / script).read_text()
    entry = source[source.index('if __name__ == "__main__":'):]
    assert "run_cli(main)" in entry, entry


def test_linearize_refuses_a_checkpoint_made_from_another_model(tmp_path, capsys, script_module):
    """The README's `--recovered liger-hybrid=out/liger-hybrid` after a builtin:tiny recipe was scored against the
    default builtin:small: that model's perplexity, KL and top-1 printed as the checkpoint's, nothing said."""
    import json

    folder = tmp_path / "liger-hybrid"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "compression": {
        "source_model": "builtin:tiny", "passes": [{"pass": "linearize", "args": {}}]}}))
    with pytest.raises(SystemExit) as exit_:
        run_cli(script_module("benchmarks/linearize.py").main, ["--recovered", f"liger-hybrid={folder}"])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in stderr, stderr
    assert "was made from builtin:tiny, not from --model builtin:small" in stderr
    assert "pass --model builtin:tiny" in stderr

"""The benchmark scripts treat a user's mistake like the CLI does: one line on stderr, exit 2, no traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

from compress.bench_args import fraction, positive_int

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script,args,fragment", [
    ("kv_cache.py", ["--windows", "0"], "argument --windows: 0 must be at least 1"),
    ("kv_cache.py", ["--only", "kivi-2", "gear-4-kk"], "--only gear-4-kk: no such configuration"),  # was dropped
    ("kv_cache.py", ["--compare", "kivi-4"], "expected A:B (two configuration names)"),
    ("kv_cache.py", ["--compare", "kivi-4:kivi-9"], "unknown configuration 'kivi-9'"),
    ("kv_cache.py", ["--compare", "kivi-4:dynamic-fp32"], "is the reference (KL 0)"),
    ("kv_serving.py", ["--shapes", "foo"], "write batch,context,head_dim"),
    ("prune.py", ["--model", "/nonexistent/model"], "error: model /nonexistent/model does not exist"),
    ("compose.py", ["--recipes", "/nonexistent.yaml"], "--recipes: no such file"),
    ("offload_memory.py", ["--max-memory", "bogus"], "cannot read memory size 'bogus'"),
])
def test_bad_arguments_are_one_line_and_exit_2(script, args, fragment):
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_argument_types():
    import argparse

    assert positive_int("3") == 3 and fraction("0.5") == 0.5
    for bad in ("0", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        fraction("2")

"""What every script in benchmarks/ shares for its command line: argument types that refuse nonsense at parse time
(argparse prints one line and exits 2) and a runner that turns this library's user errors into one line and exit 2,
as the `compress` CLI does, instead of a traceback."""
from __future__ import annotations

import argparse
import sys

from .errors import CompressError


def int_at_least(low: int):
    """An argparse type: a whole number >= `low` (1: a count; 0: a length where 0 means "off"; 2: a window that
    must hold a prediction)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be {'0 or more' if low == 0 else f'at least {low}'}")
        return value
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def int_list(low: int):
    """An argparse type: comma-separated whole numbers, each >= `low` (e.g. "256,512,1000")."""
    item = int_at_least(low)

    def parse(text: str) -> tuple[int, ...]:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"{text!r}: write comma-separated whole numbers, e.g. 256,512")
        return tuple(item(p) for p in parts)
    return parse


def head_pairs(text: str) -> list[tuple[int, int]]:
    """An argparse type: attention heads as comma-separated layer:head pairs ("5:0,6:4"), both from 0."""
    pairs = []
    for item in text.split(","):
        layer, sep, head = item.strip().partition(":")
        try:
            pair = (int(layer), int(head)) if sep else None
        except ValueError:
            pair = None
        if pair is None or min(pair) < 0:
            raise argparse.ArgumentTypeError(f"{text!r}: write layer:head pairs counted from 0, e.g. 5:0,6:4")
        pairs.append(pair)
    return pairs


def heads_problem(pairs: list[tuple[int, int]], config) -> str | None:
    """Why `pairs` (head_pairs) name no heads of a model of `config`, or None."""
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    outside = [f"{layer}:{head}" for layer, head in pairs if layer >= layers or head >= heads]
    if outside:
        return (f"{', '.join(outside)}: the model has layers 0 .. {layers - 1} and heads 0 .. {heads - 1} in each")
    return None


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def fill_unset(args, defaults: dict[str, tuple], quick: bool) -> None:
    """`defaults`: {argument: (its default, its default with --quick)} for arguments parsed with default None, so
    that --quick shortens only what the command line did not give."""
    for key, (full, short) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, short if quick else full)


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{value} must be at most 1")
    return value


def output_file(text: str) -> str:
    """A file the script writes when it is done: checked at parse time, so that a run of minutes does not end in a
    traceback at its last line."""
    from pathlib import Path

    from .output_folder import file_target_problem

    problem = file_target_problem(Path(text).expanduser())
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"--device {device}, but torch sees no CUDA GPU here; use --device cpu")
    return device


def run_cli(main, *args) -> None:
    """Call `main`; a CompressError (a missing model, a bad file, a wrong device...) is one line on stderr, exit 2."""
    try:
        code = main(*args)
    except CompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if isinstance(code, int):
        raise SystemExit(code)

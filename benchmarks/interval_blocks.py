"""Are held-out windows independent samples? The paired perplexity ratio of two models with its 95% interval over
windows, and over runs of 4, 8, 16 consecutive windows (batch means): if neighbouring windows (one document) move
together, the interval widens with the run length, and the window-level one understates the uncertainty. The
widening is given for the half-width and for the standard error alone (fewer samples also raise the t quantile).

    OMP_NUM_THREADS=1 python benchmarks/interval_blocks.py MODEL BASELINE [--windows 199] [--json]"""
from __future__ import annotations

import argparse
import json
import math

import torch

import compress
from compress.bench_args import int_at_least, run_cli
from compress.evaluate import heldout_windows, score_windows
from compress.intervals import paired_log_ratio, t_quantile_975

BLOCKS = (1, 4, 8, 16)


def block_intervals(model, baseline, windows: torch.Tensor, batch_size: int = 8) -> list[dict]:
    ours, base = score_windows(model, windows, baseline, batch_size=batch_size)
    nll, base_nll = torch.cat(ours.window_nll), torch.cat(base.window_nll)
    positions = torch.cat(ours.window_positions)
    rows = []
    for block in BLOCKS:
        samples = -(-windows.shape[0] // block)  # a last, shorter run counts (compress.intervals)
        if samples < 2:
            continue
        est, lo, hi = paired_log_ratio(nll, base_nll, positions, block)
        rows.append({"block": block, "samples": samples, "ppl_ratio": math.exp(est),
                     "ppl_ratio_ci95": [math.exp(lo), math.exp(hi)], "half_width": (math.exp(hi) - math.exp(lo)) / 2,
                     # the standard error of the log ratio, without the t quantile's share of the widening
                     "standard_error": (hi - lo) / 2 / t_quantile_975(samples - 1)})
    for r in rows:
        first = rows[0]
        r["widening"] = r["half_width"] / first["half_width"] if first["half_width"] else None
        r["se_widening"] = r["standard_error"] / first["standard_error"] if first["standard_error"] else None
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("baseline")
    ap.add_argument("--windows", type=int_at_least(2), default=199, help="held-out windows of 256 tokens (at "
                    "least 2: an interval needs two samples)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    model, baseline = (compress.load(m, dtype="float32") for m in (args.model, args.baseline))
    windows = heldout_windows(compress.load_tokenizer(args.baseline), max_windows=args.windows)
    rows = block_intervals(model, baseline, windows)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{args.model} vs {args.baseline}, {windows.shape[0]} windows of {windows.shape[1]} tokens")
    times = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731 (None: models alike, a zero-width interval)
    for r in rows:
        lo, hi = r["ppl_ratio_ci95"]
        print(f"runs of {r['block']:2d} windows ({r['samples']:3d} samples): ratio {r['ppl_ratio']:.4f} "
              f"[{lo:.4f}, {hi:.4f}], half-width {r['half_width']:.4f} ({times(r['widening'])}; standard error "
              f"{times(r['se_widening'])})")


if __name__ == "__main__":
    run_cli(main)

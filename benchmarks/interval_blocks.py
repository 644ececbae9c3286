"""Are held-out windows independent samples? The paired perplexity ratio of two models with its 95% interval over
windows, and over runs of 4, 8, 16 consecutive windows (batch means): if neighbouring windows (one document) move
together, the interval widens with the run length, and the window-level one understates the uncertainty.

    OMP_NUM_THREADS=1 python benchmarks/interval_blocks.py MODEL BASELINE [--windows 199] [--json]"""
from __future__ import annotations

import argparse
import json

import torch

import compress
from compress.bench_args import positive_int, run_cli
from compress.evaluate import MetricAccumulator, heldout_windows, logits_of
from compress.intervals import paired_log_ratio
from compress.progress import progress_bar

BLOCKS = (1, 4, 8, 16)


@torch.no_grad()
def block_intervals(model, baseline, windows: torch.Tensor, batch_size: int = 8) -> list[dict]:
    ours, base = MetricAccumulator(), MetricAccumulator()
    for i in progress_bar(range(0, windows.shape[0], batch_size), description="scoring"):
        x = windows[i:i + batch_size]
        ours.add(logits_of(model, x)[:, :-1], x[:, 1:])
        base.add(logits_of(baseline, x)[:, :-1], x[:, 1:])
    nll, base_nll = torch.cat(ours.window_nll), torch.cat(base.window_nll)
    positions = torch.cat(ours.window_positions)
    rows = []
    for block in BLOCKS:
        if windows.shape[0] // block < 2:
            continue
        est, lo, hi = (torch.tensor(v).exp().item() for v in paired_log_ratio(nll, base_nll, positions, block))
        rows.append({"block": block, "samples": windows.shape[0] // block, "ppl_ratio": est,
                     "ppl_ratio_ci95": [lo, hi], "half_width": (hi - lo) / 2})
    for r in rows:
        r["widening"] = r["half_width"] / rows[0]["half_width"] if rows[0]["half_width"] else None
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("baseline")
    ap.add_argument("--windows", type=positive_int, default=199, help="held-out windows of 256 tokens")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    model, baseline = (compress.load(m, dtype="float32") for m in (args.model, args.baseline))
    windows = heldout_windows(compress.load_tokenizer(args.baseline), max_windows=args.windows)
    rows = block_intervals(model, baseline, windows)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{args.model} vs {args.baseline}, {windows.shape[0]} windows of {windows.shape[1]} tokens")
    for r in rows:
        lo, hi = r["ppl_ratio_ci95"]
        print(f"runs of {r['block']:2d} windows ({r['samples']:3d} samples): ratio {r['ppl_ratio']:.4f} "
              f"[{lo:.4f}, {hi:.4f}], half-width {r['half_width']:.4f} ({r['widening']:.2f}x)")


if __name__ == "__main__":
    run_cli(main)

"""VQ-Logits benchmark: the paper's plain copy vs + per-token scale/bias vs + distillation, against the dense head.

One run, one table:
  - `--model` (default builtin:small, the trained reference model; builtin:tiny for quick runs), K in {256, 512, 1024, 2048}: head parameter and byte ratios,
    perplexity, KL(dense || ours) and top-1 agreement on the held-out text, and head compute time vs dense;
  - llama3-8b-shape (V=128256, d=4096, K=2048, random weights): parameter/byte ratios and head compute time.

Quality protocol: as compress.evaluate (non-overlapping 256-token held-out windows, every next-token position).
Only the head changes, so the backbone runs once: the hidden states entering the head are captured and every head
(dense and VQ) is scored on the same hidden states (64 windows by default). Speed: median wall time of the head's
forward (dense F.linear vs VQLogitsHead on the torch CPU path), for 1 token (decoding) and 128 tokens (a prompt),
timed in alternation in this one process with 1 torch thread (see `speedups`).
Parameters: dense V*d against the VQ head's floating-point numbers (codebook, shortlist rows, scales, biases); the
integer code map is reported in the byte ratios (and `head_numbers_ratio`, which counts it as numbers too).

    python benchmarks/vq_logits.py            # table
    python benchmarks/vq_logits.py --json     # JSON list of rows on stdout
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import compress
from compress.calibration import CalibrationSpec, build_batches
from compress.evaluate import MetricAccumulator, heldout_windows
from compress.vq_logits import VQLogits, VQLogitsHead
from compress.vq_logits.pass_ import build_vq_head
from compress.bench_args import nonnegative_int, output_file, positive_float, positive_int, run_cli  # noqa: E402

KS = (256, 512, 1024, 2048)
LLAMA3_8B = {"vocab": 128256, "hidden": 4096, "K": 2048}
TOKENS = (1, 128)


@torch.no_grad()
def head_inputs(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Hidden states entering lm_head for every window position: [n, seq_len, d]."""
    captured = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: captured.append(i[0].detach().float()))
    try:
        for i in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[i:i + batch_size], use_cache=False)
    finally:
        hook.remove()
    return torch.cat(captured)


@torch.no_grad()
def quality(head_fn, hidden: torch.Tensor, windows: torch.Tensor, dense_weight: torch.Tensor) -> dict:
    acc = MetricAccumulator()
    for i in range(0, windows.shape[0], 8):
        h = hidden[i:i + 8, :-1]
        acc.add(head_fn(h).float(), windows[i:i + 8, 1:], F.linear(h, dense_weight))
    return acc.result(True)


def _calls_per_batch(fn, min_batch_seconds: float) -> int:
    fn()
    t0 = time.perf_counter()
    fn()
    return max(1, int(min_batch_seconds / max(time.perf_counter() - t0, 1e-6)))


def paired_median_seconds(fns, repeats: int, min_batch_seconds: float = 0.02) -> list[float]:
    """Median seconds per call of each function. The functions are timed in alternation (A, B, A, B, ...) so that
    both see the same machine load; each timed batch loops enough calls to last about `min_batch_seconds`."""
    inner = [_calls_per_batch(fn, min_batch_seconds) for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(inner[i]):
                fn()
            times[i].append((time.perf_counter() - t0) / inner[i])
    return [statistics.median(t) for t in times]


@torch.no_grad()
def speedups(dense_weight: torch.Tensor, head: VQLogitsHead, repeats: int, threads: int) -> dict:
    """dense time / VQ time of the head forward, per token count, same inputs, same process, `threads` threads
    (1 by default: on a shared 2-core machine, multi-threaded timings are dominated by waits for a busy core)."""
    out = {}
    gen = torch.Generator().manual_seed(1)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in TOKENS:
            h = torch.randn(n, dense_weight.shape[1], generator=gen).to(dense_weight.dtype)
            dense, ours = paired_median_seconds([lambda: F.linear(h, dense_weight), lambda: head(h)], repeats)
            out[n] = dense / ours
            out[f"ms_{n}"] = (round(dense * 1e3, 4), round(ours * 1e3, 4))
    finally:
        torch.set_num_threads(saved)
    return out


def ratios(dense_weight: torch.Tensor, head: VQLogitsHead) -> dict:
    """Parameters: dense V*d vs the VQ head's floating numbers (codebook, shortlist rows, scales, biases); the
    integer code map is counted in bytes, not parameters. Bytes: tensors actually held (fp32 compute copies), and
    as stored in a bf16 checkpoint (floats at 2 bytes, codes at their integer width)."""
    held = compress.pass_api.tensor_bytes(head)
    stored = sum(p.numel() * 2 for p in head.parameters()) + sum(b.numel() * b.element_size() for b in head.buffers())
    all_numbers = head.num_float_parameters() + head.codes.numel() + head.shortlist_ids.numel()
    return {
        "head_params": head.num_float_parameters(),
        "head_params_ratio": dense_weight.numel() / head.num_float_parameters(),
        "head_numbers_ratio": dense_weight.numel() / all_numbers,
        "head_bytes_ratio": dense_weight.numel() * dense_weight.element_size() / held,
        "head_bytes_ratio_bf16_checkpoint": dense_weight.numel() * 2 / stored,
    }


def reference_rows(args, progress: bool) -> list[dict]:
    model = compress.load(args.model, dtype="float32")
    tok = compress.load_tokenizer(args.model)
    windows = heldout_windows(tok, seq_len=256, max_windows=args.max_windows)
    dense_weight = model.lm_head.weight.detach().float()
    eval_hidden = head_inputs(model, windows)
    calib = build_batches(CalibrationSpec(source="builtin:calibration", num_samples=args.calib_samples, seq_len=256),
                          tok)
    calib_hidden = head_inputs(model, calib).reshape(-1, dense_weight.shape[1])
    counts = torch.bincount(calib.flatten(), minlength=dense_weight.shape[0]).float()
    base = quality(lambda h: F.linear(h, dense_weight), eval_hidden, windows, dense_weight)
    rows = [{"model": args.model, "K": None, "variant": "dense", "head_params": dense_weight.numel(),
             "head_params_ratio": 1.0, "head_bytes_ratio": 1.0, "perplexity": base["perplexity"], "kl": 0.0,
             "top1_agreement": 1.0, "head_speedup": 1.0, "eval_tokens": base["tokens"]}]
    for k in KS:
        cfg = VQLogits.Config(num_codes=k, shortlist=args.shortlist, distill=True, distill_steps=args.distill_steps,
                              distill_seconds=args.distill_seconds, distill_batch_size=args.distill_batch_size,
                              distill_lr=args.distill_lr)
        t0 = time.perf_counter()
        stages, details = build_vq_head(dense_weight, calib_hidden, counts, cfg, progress=progress, keep_stages=True)
        fit_seconds = time.perf_counter() - t0
        speed = speedups(dense_weight, stages[-1][1], args.repeats, args.threads)
        for variant, head in stages:
            q = quality(head, eval_hidden, windows, dense_weight)
            rows.append({"model": args.model, "K": k, "variant": variant, **ratios(dense_weight, head),
                         "perplexity": q["perplexity"], "kl": q["kl"], "top1_agreement": q["top1_agreement"],
                         "head_speedup": speed[1], "head_speedup_128_tokens": speed[128],
                         "head_ms_dense_vq": {1: speed["ms_1"], 128: speed["ms_128"]},
                         "fit_seconds": round(fit_seconds, 1),
                         **({"distill_steps": details["distill"]["steps"]} if variant == "distill" else {})})
        print(f"{args.model} K={k} done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return rows


def llama_rows(args) -> list[dict]:
    """Random weights at Llama-3-8B's head shape: parameters, bytes and compute time only (no quality)."""
    v, d, k = LLAMA3_8B["vocab"], LLAMA3_8B["hidden"], LLAMA3_8B["K"]
    gen = torch.Generator().manual_seed(0)
    dense_weight = torch.randn(v, d, generator=gen).mul_(0.02)
    # the code map and scale/bias values do not change the cost; a random map stands in for k-means here
    head = VQLogitsHead.from_parts(torch.randn(k, d, generator=gen).mul_(0.02),
                                   torch.randint(0, k, (v,), generator=gen),
                                   torch.rand(v, generator=gen) + 0.5, torch.randn(v, generator=gen))
    speed = speedups(dense_weight, head, args.repeats, args.threads)
    return [{"model": "llama3-8b-shape", "K": k, "variant": "scale_bias", **ratios(dense_weight, head),
             "perplexity": None, "kl": None, "top1_agreement": None,
             "head_speedup": speed[1], "head_speedup_128_tokens": speed[128],
             "head_ms_dense_vq": {1: speed["ms_1"], 128: speed["ms_128"]}}]


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict], threads: int) -> None:
    """A markdown table (pasted as is into BENCHMARKS.md)."""
    cols = ["model", "K", "variant", "params ratio", "bytes ratio", "perplexity", "KL", "top-1",
            "head speedup 1 tok", "head speedup 128 tok"]
    print(f"CPU ({torch.get_num_threads()} threads for fitting, {threads} for head timing); ratios are dense / VQ")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = [r["model"], fmt(r["K"], "d"), r["variant"], fmt(r["head_params_ratio"], ".1f") + "x",
                 fmt(r["head_bytes_ratio"], ".1f") + "x", fmt(r["perplexity"], ".2f"), fmt(r["kl"], ".4f"),
                 fmt(r["top1_agreement"], ".3f"), fmt(r["head_speedup"], ".1f") + "x",
                 fmt(r.get("head_speedup_128_tokens"), ".1f") + ("x" if "head_speedup_128_tokens" in r else "")]
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:small", help="reference model (builtin:tiny for quick runs)")
    ap.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of a table")
    ap.add_argument("--max-windows", type=positive_int, default=64, help="held-out windows of 256 tokens to score")
    ap.add_argument("--calib-samples", type=positive_int, default=128, help="calibration windows of 256 tokens")
    # VQLogits.Config's bounds, checked here: not in a traceback after the model loads
    ap.add_argument("--shortlist", type=nonnegative_int, default=0)
    ap.add_argument("--distill-steps", type=positive_int, default=100)
    ap.add_argument("--distill-seconds", type=positive_float, default=45.0)
    ap.add_argument("--distill-batch-size", type=positive_int, default=256)
    ap.add_argument("--distill-lr", type=positive_float, default=3e-3)
    ap.add_argument("--repeats", type=positive_int, default=7, help="timed repeats per measurement (median)")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads while timing the heads")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--save", type=output_file, help="also write the JSON rows to this file")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = reference_rows(args, progress=not args.json and sys.stderr.isatty())
    if not args.skip_llama:
        rows += llama_rows(args)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(rows, f, indent=1)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows, args.threads)
    return 0


if __name__ == "__main__":
    run_cli(main)

"""Decode attention over the compressed KV cache vs dense attention, one process, one table.

Queries, keys and values are the reference model's own (builtin:tiny, post-RoPE, on held-out text; the
model's 1024 positions are tiled for longer contexts). For each context and cache format the compressed store is
built with the cache's own code (compress.kvcache CompressedStore: quantize + outliers + low-rank by power
iteration), then one decode step (1 token, 4 query heads on 2 KV heads) is timed for:
  dense fp32   SDPA over dense fp32 K/V (the CPU model's own cache: the baseline of the speed ratios)
  dense fp16   SDPA over dense fp16 K/V
  dequant      dequantize the whole compressed cache, then SDPA (what a cache without a storage-reading kernel does)
  ours         compressed_decode_attention: reads codes, scales, outliers and low-rank factors directly
Speed ratios are baseline time / our time (> 1: ours faster); the functions take turns over 3 rounds of 5 timed
blocks and each keeps its fastest block. On the CPU with one thread the clock is the process's CPU time, so time
spent waiting for a core on a shared machine is not counted. On the CPU, fp16 matmuls are slow (no native fp16 arithmetic), so
dense fp32 is the fair CPU baseline; dense fp16 is there because it is the GPU baseline.
rel_err = |ours - exact| / |exact| over the last 16 positions (causal), exact = float64 attention over the original
K/V, averaged over the 6 layers (per layer in --json): the error of the cache format, computed through our kernel;
timings use one layer (--layer). bytes = compressed store + window, over dense
fp16 K/V (bits/elem: the same, per K or V element).
On the CPU the torch reference runs; the Triton kernel runs only when CUDA is present (skipped otherwise).

    OMP_NUM_THREADS=1 python benchmarks/kv_kernels.py [--contexts 1024 4096 16384] [--json]"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from compress.kernels.kv_attention import compressed_decode_attention
from compress.kernels.dispatch import use_triton
from compress.bench_args import int_at_least, positive_float, run_cli  # noqa: E402

FORMATS = {  # name: (bits, outlier_ratio, rank)
    "kivi-4": (4, 0.0, 0), "kivi-2": (2, 0.0, 0), "gear-4": (4, 0.02, 2), "gear-2": (2, 0.02, 4),
}
GROUP, CHUNK, WINDOW = 64, 64, 32
ERROR_QUERIES = 16  # the last 16 positions, causally, for the error column; one query for the timings


def capture_qkv(tokens: int = 1024) -> list:
    """Per layer of the reference model on held-out text: (q [1, 4, 16, 64] of the last 16 positions, k, v
    [1, 2, tokens, 64]), post-RoPE, as attention receives them."""
    import compress
    from compress.calibration import builtin_text
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = compress.load("builtin:tiny", dtype="float32")  # `auto` is bf16 on CPUs with native bf16
    tok = compress.load_tokenizer("builtin:tiny")
    ids = tok(builtin_text("builtin:heldout"), return_tensors="pt").input_ids[:, :tokens]
    seen = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = (query[:, :, -ERROR_QUERIES:].detach().clone(), key.detach().clone(),
                                  value.detach().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("capture_qkv", capture)
    model.set_attn_implementation("capture_qkv")
    with torch.no_grad():
        model(ids)
    return [seen[i] for i in sorted(seen)]


def build_store(x: torch.Tensor, axis: str, bits: int, outlier_ratio: float, rank: int):
    from compress.kvcache.store import CompressedStore

    store = CompressedStore(axis=axis, bits=bits, group_size=GROUP, chunk_len=CHUNK, outlier_ratio=outlier_ratio,
                            power_iters=3)
    store.append(x, rank)
    return store


def store_bytes(store) -> int:
    return sum(t.untyped_storage().nbytes() for ts in store.tensors_by_kind().values() for t in ts)


def cpu_clock():
    """With one torch thread, the process's CPU time: unlike wall time it does not count the time this process
    waits for a core on a shared machine. With more threads (or a GPU), wall time."""
    return time.process_time if torch.get_num_threads() == 1 and not torch.cuda.is_available() else time.perf_counter


def time_us(fns: dict, min_run_time: float, rounds: int = 3, blocks: int = 5) -> dict:
    """Microseconds per call of each function. The functions take turns for `rounds` rounds; each round times
    `blocks` blocks of calls per function, and the fastest block counts (the least disturbed one)."""
    clock = cpu_clock()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best = {name: float("inf") for name in fns}
    calls = {}
    for name, fn in fns.items():  # calls per block: about min_run_time / blocks of work
        n, spent = 1, 0.0
        while spent < min_run_time / blocks / 4:
            start = clock()
            for _ in range(n):
                fn()
            sync()
            spent = clock() - start
            n *= 2
        calls[name] = max(1, int(n / 2 * (min_run_time / blocks) / max(spent, 1e-9)))
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(blocks):
                start = clock()
                for _ in range(calls[name]):
                    fn()
                sync()
                best[name] = min(best[name], (clock() - start) / calls[name] * 1e6)
    return best


def exact_attention(q, k, v):
    """float64 causal attention of the last q.shape[2] positions over k, v."""
    groups, l, kv = q.shape[1] // k.shape[1], q.shape[2], k.shape[2]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    future = torch.arange(kv, device=q.device) > torch.arange(kv - l, kv, device=q.device).view(-1, 1)
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


def tiled(x: torch.Tensor, tokens: int) -> torch.Tensor:
    return x.repeat(1, 1, -(-tokens // x.shape[2]), 1)[:, :, :tokens]


def run(contexts, layer: int, min_run_time: float, device: str):
    layers = [[t.to(device) for t in qkv] for qkv in capture_qkv()]
    rows = []
    for ctx in contexts:
        n = (ctx - WINDOW) // CHUNK * CHUNK
        for name, (bits, ratio, rank) in FORMATS.items():
            errors = []
            for i, (q_all, k1, v1) in enumerate(layers):  # the error of the format, in every layer
                k, v = tiled(k1, ctx), tiled(v1, ctx)
                keys = build_store(k[:, :, :n], "token", bits, ratio, rank)
                values = build_store(v[:, :, :n], "channel", bits, ratio, rank)
                wk, wv = k[:, :, n:].half(), v[:, :, n:].half()
                out = compressed_decode_attention(q_all, keys, values, wk, wv)  # causal over the last positions
                exact = exact_attention(q_all, k, v)
                errors.append(((out.double() - exact).norm() / exact.norm()).item())
                if i == layer:
                    timed = (q_all[:, :, -1:].contiguous(), k.contiguous(), v.contiguous(), keys, values, wk, wv)
            qd, k32, v32, keys, values, wk, wv = timed
            q16, k16, v16 = qd.half(), k32.half(), v32.half()

            def dequant_then_dense():
                kd = torch.cat([keys.dequantize(), wk.float()], 2)
                vd = torch.cat([values.dequantize(), wv.float()], 2)
                return F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)

            times = time_us({
                "dense32": lambda: F.scaled_dot_product_attention(qd, k32, v32, enable_gqa=True),
                "dense16": lambda: F.scaled_dot_product_attention(q16, k16, v16, enable_gqa=True),
                "dequant": dequant_then_dense,
                "ours": lambda: compressed_decode_attention(qd, keys, values, wk, wv)}, min_run_time)
            held = store_bytes(keys) + store_bytes(values) + 2 * wk.numel() * wk.element_size()
            rows.append(dict(
                device=device, path="triton" if use_triton(qd) else "torch reference", context=ctx, format=name,
                bits=bits, outlier_ratio=ratio, rank=rank,
                bits_per_element=8 * held / (2 * k32.numel()), bytes_ratio_vs_fp16=held / (2 * k32.numel() * 2),
                rel_err=sum(errors) / len(errors), rel_err_per_layer=errors,
                speed_vs_dense_fp32=times["dense32"] / times["ours"],
                speed_vs_dense_fp16=times["dense16"] / times["ours"],
                speed_vs_dequant_then_dense=times["dequant"] / times["ours"], threads=torch.get_num_threads()))
    return rows


def print_table(rows, title):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    cols = ["context", "format", "bits/elem", "bytes vs fp16", "rel err", "vs dense fp32", "vs dense fp16",
            "vs dequant+dense"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(str(r["context"]), r["format"], f"{r['bits_per_element']:.2f}", f"{r['bytes_ratio_vs_fp16']:.3f}",
                      f"{r['rel_err']:.2e}", f"{r['speed_vs_dense_fp32']:.2f}x", f"{r['speed_vs_dense_fp16']:.2f}x",
                      f"{r['speed_vs_dequant_then_dense']:.2f}x")
    Console(width=160).print(table)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # a shorter context has no whole chunk past the fp16 window: nothing to compress
    parser.add_argument("--contexts", type=int_at_least(WINDOW + CHUNK), nargs="+", default=[1024, 4096, 16384],
                        help=f"context lengths, each at least {WINDOW + CHUNK} (the fp16 window and one chunk)")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--min-run-time", type=positive_float, default=0.2, help="seconds per function per round")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    args = parser.parse_args(argv)
    import compress

    layers = compress.load("builtin:tiny", meta=True).config.num_hidden_layers
    if not 0 <= args.layer < layers:
        parser.error(f"--layer {args.layer}: builtin:tiny has layers 0 .. {layers - 1}")
    rows = run(args.contexts, args.layer, args.min_run_time, "cpu")
    if torch.cuda.is_available():
        rows += run(args.contexts, args.layer, args.min_run_time, "cuda")
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print_table([r for r in rows if r["device"] == "cpu"],
                f"CPU decode attention, torch reference ({torch.get_num_threads()} thread(s), "
                f"{'CPU' if cpu_clock() is time.process_time else 'wall'} time); ratios = baseline / ours")
    if torch.cuda.is_available():
        print_table([r for r in rows if r["device"] == "cuda"],
                    f"CUDA decode attention, Triton ({torch.cuda.get_device_name()}); ratios = baseline / ours")
    else:
        print("Triton path: skipped (no CUDA device here); no GPU numbers are claimed.", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)

"""KV cache at serving shapes: decode attention over the compressed cache vs fp16 SDPA, and an end-to-end row.

One process, one table. Attention rows: Llama-3-8B attention (32 query heads on 8 KV heads, head_dim 128; also
head_dim 64), keys-like random data (channels of very different scales, a few spikes; random values are fine for
speed and bytes, and rel_err measures the format through our kernel, not a model's quality). For each format the
store is built by the cache's own code (CompressedStore, paged format v2) and one decode step (1 new token, a
window of 32 fp16 tokens) is timed:
  sdpa fp16   F.scaled_dot_product_attention over dense fp16 K/V of the same tokens (the baseline of speedup)
  ours        compressed_decode_attention (Triton flash-decoding on CUDA, the C kernel on the CPU)
bytes_vs_fp16 = bytes held by the compressed stores + window / bytes of the fp16 K/V; rel_err = |ours - exact| /
|exact| for the first batch row, exact = float64 attention over the original K/V. On the CPU fp16 matmuls are
emulated (slow), so `speedup_vs_sdpa_fp32` (dense fp32 SDPA, the CPU's natural baseline) is given too.

End-to-end rows (unless `--no-e2e`): a 2-layer Llama with Llama-3-8B layer shapes (random weights; bf16 on CUDA, fp32
on the CPU where bf16 is emulated), a prompt then greedy decoding, DynamicCache vs GEARCache with the "gear_kv"
attention: decode tokens/s, peak memory (CUDA allocator), cache bytes, and the largest batch whose cache fits a fixed
budget (`max_batch_gain`: against a 16-bit DynamicCache, also on the CPU where the measured one is fp32). In these
rows rel_err = |logits - DynamicCache's| / |DynamicCache's| after the prompt (the first token the cache decides), and
speedup_vs_sdpa_fp16 = tokens/s over DynamicCache's where that cache is 16-bit (CUDA; its attention is SDPA), null on
the CPU (fp32 baseline: see speedup_vs_dynamic).
Outside baselines in the same table (`--baselines`, where installed: `pip install -e ".[bench]"`): transformers'
QuantizedCache with the quanto (int2/int4) and HQQ backends, and its fp8 one.

    OMP_NUM_THREADS=1 python benchmarks/kv_serving.py [--json]        # CPU: small shapes, a few minutes
    python benchmarks/kv_serving.py --json                             # CUDA: 8k/32k/128k, batch 1 and 8, e2e at 32k"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_kernels import time_us  # noqa: E402  (the interleaved best-of-blocks timer)

from compress.kernels.kv_attention import compressed_decode_attention, decode_attention_path  # noqa: E402
from compress.kvcache.store import CompressedStore  # noqa: E402
from compress.bench_args import check_device, nonnegative_float, positive_float, positive_int, run_cli  # noqa: E402

FORMATS = {  # name: (bits, outlier_ratio, key_rank, value_rank, scale format); "-s8": one-byte scales
    "kivi-2": (2, 0.0, 0, 0, "fp16"), "kivi-4": (4, 0.0, 0, 0, "fp16"), "gear-2": (2, 0.02, 2, 2, "fp16"),
    "gear-4": (4, 0.02, 2, 2, "fp16"), "kivi-2-s8": (2, 0.0, 0, 0, "log8"), "gear-4-s8": (4, 0.02, 2, 2, "log8"),
}
E2E_FORMATS = ("kivi-2", "kivi-4", "gear-2", "gear-4")
GROUP = CHUNK = 64
WINDOW = 32


def keys_like(b, h, n, d, device, gen):
    x = torch.randn(b, h, n, d, generator=gen, device=device) * torch.linspace(0.2, 4.0, d, device=device)
    spikes = torch.rand(x.shape, generator=gen, device=device) < 0.005
    return torch.where(spikes, 6 * x, x)


def build_store(x, axis, bits, ratio, rank, scale_format="fp16"):
    s = CompressedStore(axis=axis, bits=bits, group_size=GROUP, chunk_len=CHUNK, outlier_ratio=ratio, power_iters=2,
                        scale_format=scale_format)
    for start in range(0, x.shape[2], 8192):  # like a chunked prefill: bounded temporaries
        s.append(x[:, :, start:start + 8192], rank)
    return s


def held_bytes(*stores) -> int:
    return sum(t.untyped_storage().nbytes() for s in stores for ts in s.tensors_by_kind().values() for t in ts)


def exact_attention(q, k, v):
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    return ((q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def attention_rows(device, shapes, min_run_time, deadline=math.inf):
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for batch, context, d, hq, h in shapes:
        if time.time() > deadline:
            print(f"[skip] batch {batch} context {context} head_dim {d}: past --max-seconds", file=sys.stderr)
            continue
        n = (context - WINDOW) // CHUNK * CHUNK
        try:
            k = keys_like(batch, h, context, d, device, gen).half()
            v = torch.randn(batch, h, context, d, generator=gen, device=device).half()
        except torch.OutOfMemoryError:
            print(f"[skip] batch {batch} context {context}: out of memory", file=sys.stderr)
            continue
        q = torch.randn(batch, hq, 1, d, generator=gen, device=device)
        exact = exact_attention(q[:1], k[:1], v[:1])
        k32, v32 = (k.float(), v.float()) if device == "cpu" else (None, None)
        baseline = {"sdpa_fp16": lambda: F.scaled_dot_product_attention(q.half(), k, v, enable_gqa=True)}
        if k32 is not None:
            baseline["sdpa_fp32"] = lambda: F.scaled_dot_product_attention(q, k32, v32, enable_gqa=True)
        base_t = time_us(baseline, min_run_time)
        for name, (bits, ratio, kr, vr, sf) in FORMATS.items():
            t0 = time.perf_counter()
            keys, values = build_store(k[:, :, :n], "token", bits, ratio, kr, sf), \
                build_store(v[:, :, :n], "channel", bits, ratio, vr, sf)
            if device == "cuda":
                torch.cuda.synchronize()
            compress_ms = 1e3 * (time.perf_counter() - t0)  # the prompt's K/V quantized and packed (a prefill's cost)
            wk, wv = k[:, :, n:].contiguous(), v[:, :, n:].contiguous()
            out = compressed_decode_attention(q, keys, values, wk, wv)
            err = ((out[:1].double() - exact).norm() / exact.norm()).item()
            ours = time_us({"ours": lambda: compressed_decode_attention(q, keys, values, wk, wv)}, min_run_time)["ours"]
            held = held_bytes(keys, values) + 2 * wk.numel() * 2
            row = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", kind="attention",
                       path=decode_attention_path(q, keys, values, wk), format=name, bits=bits,
                       outlier_ratio=ratio, key_rank=kr, value_rank=vr, scale_format=sf, batch=batch,
                       context=context, head_dim=d, q_heads=hq, kv_heads=h, bytes_vs_fp16=held / (2 * k.numel() * 2),
                       rel_err=err, us_ours=ours, us_sdpa_fp16=base_t["sdpa_fp16"],
                       speedup_vs_sdpa_fp16=base_t["sdpa_fp16"] / ours, compress_ms=compress_ms)
            if "sdpa_fp32" in base_t:
                row["speedup_vs_sdpa_fp32"] = base_t["sdpa_fp32"] / ours
            rows.append(row)
            print(f"[{name} b{batch} {context} d{d}] {ours:.0f} us, {row['speedup_vs_sdpa_fp16']:.2f}x fp16 sdpa, "
                  f"built+timed in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            del keys, values
        del k, v, k32, v32
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def e2e_model(device, dtype, small: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, vocab_size=128256)
    if small:  # the CPU: the same head layout, narrower layers and vocabulary
        shapes.update(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=2,
                      vocab_size=32000)
    config = LlamaConfig(num_hidden_layers=2, max_position_embeddings=140_000, **shapes)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


@torch.no_grad()
def e2e_rows(device, prompt, batch, new_tokens, budget_gib, baselines, deadline=math.inf):
    from transformers import DynamicCache, QuantizedCache

    from compress.kvcache import GEARCache, use_compressed_attention
    from compress.kvcache.cache import dynamic_cache_bytes, quantized_cache_bytes

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = ids = None  # built for the first row that starts (none past the deadline)
    caches = {"dynamic": lambda: DynamicCache(config=model.config)}
    for name in E2E_FORMATS:
        bits, ratio, kr, vr, _ = FORMATS[name]
        caches[name] = (lambda b=bits, r=ratio, k=kr, v=vr: GEARCache(model.config, method="gear" if r or k or v
                        else "kivi", bits=b, outlier_ratio=r, key_rank=k, value_rank=v))
    if baselines:
        for backend, nbits in (("quanto", 2), ("quanto", 4), ("hqq", 2), ("hqq", 4)):
            caches[f"hf-{backend}-int{nbits}"] = (lambda bk=backend, nb=nbits: QuantizedCache(bk, model.config,
                                                                                              nbits=nb))
    rows, base, first_token = [], None, None
    for name, make in caches.items():
        if time.time() > deadline:  # rows not started are named, so a cut table says what it lacks
            print(f"[skip] e2e {name}: past --max-seconds", file=sys.stderr)
            continue
        if model is None:
            model = e2e_model(device, dtype, small=device == "cpu")
            use_compressed_attention(model)
            ids = torch.randint(100, model.config.vocab_size, (batch, prompt), device=device)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            cache = make()
            for s in range(0, prompt, 4096):  # chunked prefill: bounded activations
                logits = model(ids[:, s:s + 4096], cache=cache, use_cache=True, logits_to_keep=1).logits
            nxt = first_token = logits[:, -1:].argmax(-1) if first_token is None else first_token  # one input for all
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            for step in range(new_tokens):
                logits = model(nxt, cache=cache, use_cache=True).logits[:, -1:]
                if step == 0:  # the first step reading the whole prompt from the cache: its error
                    first = logits[:, -1].float()
                nxt = logits.argmax(-1)
            sync()
            seconds = time.perf_counter() - t0
        except Exception as exc:  # an outside backend that is not installed or fails: report, go on
            if not name.startswith("hf-"):
                raise
            print(f"[skip] {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", file=sys.stderr)
            continue
        nbytes = cache.nbytes()["total"] if isinstance(cache, GEARCache) else (
            dynamic_cache_bytes(cache)[0] if name == "dynamic" else quantized_cache_bytes(cache)[0])
        per_seq = nbytes / batch
        row = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", kind="e2e", format=name,
                   batch=batch, context=prompt, head_dim=model.config.head_dim, dtype=str(dtype).split(".")[-1],
                   new_tokens=new_tokens, tokens_per_s=batch * new_tokens / seconds, cache_bytes=nbytes,
                   max_batch_in_budget=int(budget_gib * 2**30 // per_seq), budget_gib=budget_gib)
        if device == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if base is None:
            base, base_logits = row, first
        fp16_bytes = base["cache_bytes"] * 16 / torch.finfo(dtype).bits  # the dense cache, were it 16-bit
        row["bytes_vs_fp16"] = nbytes / fp16_bytes
        row["rel_err"] = float((first - base_logits).norm() / base_logits.norm())
        row["speedup_vs_dynamic"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["speedup_vs_sdpa_fp16"] = row["speedup_vs_dynamic"] if torch.finfo(dtype).bits == 16 else None
        row["max_batch_gain"] = row["max_batch_in_budget"] / max(int(budget_gib * 2**30 // (fp16_bytes / batch)), 1)
        rows.append(row)
        print(f"[e2e {name}] {row['tokens_per_s']:.1f} tok/s, {nbytes / 2**20:.0f} MiB", file=sys.stderr)
        del cache
    return rows


def print_table(rows):
    from rich.console import Console
    from rich.table import Table

    att = [r for r in rows if r["kind"] == "attention"]
    if att:
        t = Table(title=f"decode attention, one step ({att[0]['device']}, {att[0]['path']}); speedup = sdpa / ours")
        for c in ("batch", "context", "head_dim", "format", "bytes vs fp16", "rel err", "us ours", "vs sdpa fp16",
                  "vs sdpa fp32", "compress ms"):
            t.add_column(c, justify="right")
        for r in att:
            t.add_row(str(r["batch"]), str(r["context"]), str(r["head_dim"]), r["format"], f"{r['bytes_vs_fp16']:.3f}",
                      f"{r['rel_err']:.2e}", f"{r['us_ours']:.0f}", f"{r['speedup_vs_sdpa_fp16']:.2f}x",
                      f"{r['speedup_vs_sdpa_fp32']:.2f}x" if "speedup_vs_sdpa_fp32" in r else "-",
                      f"{r['compress_ms']:.0f}")
        Console(width=160).print(t)
    e2e = [r for r in rows if r["kind"] == "e2e"]
    if e2e:
        t = Table(title=f"end to end: 2-layer Llama-3-8B-shaped model, {e2e[0]['dtype']}, batch {e2e[0]['batch']}, "
                        f"{e2e[0]['new_tokens']} tokens after {e2e[0]['context']} ({e2e[0]['device']})")
        for c in ("cache", "tokens/s", "vs dynamic", "logits rel err", "cache MiB", "bytes vs fp16", "peak GiB",
                  f"max batch in {e2e[0]['budget_gib']} GiB", "gain vs fp16"):
            t.add_column(c, justify="right")
        for r in e2e:
            t.add_row(r["format"], f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_dynamic']:.2f}x",
                      f"{r['rel_err']:.2e}", f"{r['cache_bytes'] / 2**20:.0f}", f"{r['bytes_vs_fp16']:.3f}",
                      f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-", str(r["max_batch_in_budget"]),
                      f"{r['max_batch_gain']:.2f}x")
        Console(width=160).print(t)


def attention_shape(text: str) -> tuple[int, int, int]:
    """`batch,context,head_dim` (argparse type: a bad one is one line and exit 2)."""
    try:
        shape = tuple(positive_int(x) for x in text.split(","))
    except argparse.ArgumentTypeError:
        shape = ()
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: write batch,context,head_dim, e.g. 8,32768,128")
    if shape[1] < WINDOW + CHUNK:  # nothing would be compressed: every token in the fp16 window
        raise argparse.ArgumentTypeError(f"{text!r}: a context under {WINDOW + CHUNK} tokens stays in the "
                                         "uncompressed window; use a longer one")
    return shape


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=check_device,
                    choices=("cpu", "cuda"), help="where to run (default: cuda when torch sees a GPU)")
    ap.add_argument("--min-run-time", type=positive_float, default=None,
                    help="seconds each timed kernel runs for (default 0.1 on CUDA, 0.5 on the CPU)")
    ap.add_argument("--no-e2e", action="store_true", help="attention rows only, no end-to-end rows")
    ap.add_argument("--baselines", action="store_true", help="add transformers' QuantizedCache quanto/HQQ rows")
    ap.add_argument("--shapes", nargs="+", metavar="B,CTX,D", type=attention_shape,
                    help="attention shapes batch,context,head_dim (32 query / 8 KV heads) instead of the device's "
                    "default list")
    ap.add_argument("--max-seconds", type=nonnegative_float, default=math.inf,
                    help="stop starting attention shapes after 60%% of this, and end-to-end rows after 85%% (they "
                    "run after the shapes)")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda":
        # most wanted first (--max-seconds may cut the tail): the target shape, then the rest
        shapes = [(8, 32768, 128, 32, 8), (1, 32768, 128, 32, 8), (8, 8192, 128, 32, 8), (1, 8192, 128, 32, 8),
                  (8, 32768, 64, 32, 8), (8, 131072, 128, 32, 8), (1, 131072, 128, 32, 8)]
        e2e = dict(prompt=32768, batch=8, new_tokens=64, budget_gib=64)
    else:
        shapes = [(1, 4096, 128, 32, 8), (1, 4096, 64, 32, 8), (4, 2048, 128, 32, 8)]
        e2e = dict(prompt=2048, batch=2, new_tokens=8, budget_gib=16)
    if args.shapes:
        shapes = [(*x, 32, 8) for x in args.shapes]
    start = time.time()
    rows = attention_rows(dev, shapes, args.min_run_time or (0.1 if dev == "cuda" else 0.5),
                          deadline=start + 0.6 * args.max_seconds)
    if not args.no_e2e:
        rows += e2e_rows(dev, baselines=args.baselines, deadline=start + 0.85 * args.max_seconds, **e2e)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows)


if __name__ == "__main__":
    run_cli(main)

"""KV cache benchmark: fp16/fp32 DynamicCache, transformers' QuantizedCache (fp8; quanto and HQQ int2/int4
where installed), KIVI and GEAR, one run, one table.

Model: `--model` (default builtin:small, the reference model that copies; builtin:tiny for quick runs), float32
on the CPU (`--dtype bfloat16`: what `dtype: auto` loads on a CPU with native bf16; the baseline cache is then bf16), attention implementation "gear_kv" (which reads a GEARCache's compressed storage and hands every
other cache to sdpa).
- quality (compress.kvcache.quality): held-out windows fed in chunks of residual_length tokens, so earlier chunks
  are compressed before later tokens are scored; perplexity change, KL(reference || ours) and top-1 agreement
  against the same chunked pass with an uncompressed DynamicCache, the change and the KL with 95% intervals over
  the windows (`ppl_delta_pct_ci95`, `kl_ci95`: each window's NLL paired with the reference's); copy probe: random token strings repeated,
  greedy accuracy over the second copy (the reference cache's own accuracy is the `fp16` row).
- bits/element: 8 x bytes actually held by the cache's tensors / key+value entries, measured at the 4k-context
  decode state (compressed chunks + partly filled fp16 window; skipped layers and metadata included).
- decode speed: contexts of 1k and 4k tokens (held-out text, repeated), each cache filled with the same prefill K/V,
  then `--steps` greedy decode steps timed; ratio = baseline (DynamicCache, sdpa) time / this cache's time, medians
  of interleaved repetitions in this one process (> 1: faster).
- memory at 16k: bytes held by the cache after a 16k-token context over bytes of an fp16 DynamicCache holding the
  same tokens (both measured from tensor storage; the transient memory of a step is not included).

    OMP_NUM_THREADS=1 python benchmarks/kv_cache.py [--json] [--quick]
    OMP_NUM_THREADS=1 python benchmarks/kv_cache.py --long 32768 [--device cuda] [--only gear-4-k1 kivi-2 ...]
    python benchmarks/kv_cache.py --residual-spectrum | --scale-error      # diagnostics on the model's K/V"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import resource
import statistics
import sys
import time

import torch
from transformers import DynamicCache, QuantizedCache

import compress
from compress import CompressError
from compress.calibration import builtin_text
from compress.kvcache import GEARCache, KVCacheSettings
from compress.budget import kv_bytes_per_token
from compress.intervals import format_interval
from compress.kvcache.cache import dynamic_cache_bytes, quantized_cache_bytes
from compress.kvcache.quality import compare_caches, copy_sequences, copy_accuracy, heldout_windows, kv_quality
from compress.bench_args import (check_device, fill_unset, nonnegative_int, output_file, positive_int,  # noqa: E402
                                 run_cli)


def config_pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not (sep and a and b):
        raise argparse.ArgumentTypeError(f"expected A:B (two configuration names), got {text!r}")
    return a, b


@functools.lru_cache(maxsize=None)
def _missing(module: str) -> bool:
    """Whether an outside backend's package is missing (said once on stderr, however often the list is built)."""
    if importlib.util.find_spec(module.split(".")[0]) is not None and importlib.util.find_spec(module) is not None:
        return False
    print(f"[skip] hf-{module.split('.')[-1]}-*: {module} is not installed (pip install -e \".[bench]\")",
          file=sys.stderr)
    return True


def configurations(quick: bool) -> list[dict]:
    """name, method, cache kwargs. Lean GEAR (paged format v2): outliers cost 24 bits (fp16 value + uint8 offset)
    per kept entry, 2 of every group of 64 at outlier_ratio 0.02 (0.75 bit/element); a rank-r term costs 16 r / D
    bits per element on its side (fp16 token factors; one channel basis per 2048-token page). Names: "o" = outliers,
    "rR" = rank R on K and V, "k1" = rank 1 on keys only, "noout" = without outliers, "fp8" = token factors in fp8
    e4m3 (half their cost), "s8" = one-byte scales (scale_format log8: 0.125 bit/element less), "k4v2" = keys at 4
    bits, values at 2 (value_bits)."""
    # the uncompressed baseline: transformers' DynamicCache in the model's dtype (float32 on the CPU)
    rows = [dict(name="dynamic-fp32", method="dynamic", bits=32),
            dict(name="hf-fp8", method="hf_quantized_fp8", bits=8)]
    # what a transformers user picks instead: QuantizedCache with its group-wise backends (per-token groups of 64
    # for keys and values, a 128-token full-precision residual), where installed (`pip install -e ".[bench]"`)
    for backend, module in (("quanto", "optimum.quanto"), ("hqq", "hqq")):
        if _missing(module):
            continue
        rows += [dict(name=f"hf-{backend}-{b}", method="hf_quantized", backend=backend, bits=b) for b in (2, 4)]
    bits_list = (2, 4) if quick else (2, 3, 4)
    for b in bits_list:
        rows.append(dict(name=f"kivi-{b}", method="kivi", bits=b, kw=dict(method="kivi", bits=b)))
        if not quick:
            rows.append(dict(name=f"kivi-{b}-s8", method="kivi", bits=b,
                             kw=dict(method="kivi", bits=b, scale_format="log8")))
    if not quick:  # keys wider than values (KIVI's k_bits / v_bits): "kB vV"
        # (k4v8 / k8v4: one side at 4 bits, the other near-exact: which side costs the quality)
        for kb, vb, sf in ((4, 2, "fp16"), (4, 2, "log8"), (4, 3, "log8"), (4, 8, "fp16"), (8, 4, "fp16")):
            rows.append(dict(name=f"kivi-k{kb}v{vb}" + ("-s8" if sf == "log8" else ""), method="kivi", bits=kb,
                             kw=dict(method="kivi", bits=kb, value_bits=vb, scale_format=sf)))
        rows.append(dict(name="gear-k4v2-k1-fp8-s8", method="gear", bits=4,
                         kw=dict(method="gear", bits=4, value_bits=2, outlier_ratio=0.0, key_rank=1, value_rank=0,
                                 lowrank_dtype="float8_e4m3fn", scale_format="log8")))
    grid = [  # (name suffix, outlier_ratio, key_rank, value_rank, low-rank factor dtype, scale format)
        ("o", 0.02, 0, 0, "float16", "fp16"), ("o-k1", 0.02, 1, 0, "float16", "fp16"),
        ("r2", 0.02, 2, 2, "float16", "fp16"), ("noout-r2", 0.0, 2, 2, "float16", "fp16"),
        ("k1", 0.0, 1, 0, "float16", "fp16"), ("k1-fp8", 0.0, 1, 0, "float8_e4m3fn", "fp16"),
        ("r2-fp8", 0.02, 2, 2, "float8_e4m3fn", "fp16"), ("o-s8", 0.02, 0, 0, "float16", "log8"),
        ("k1-fp8-s8", 0.0, 1, 0, "float8_e4m3fn", "log8"),
    ]
    for b in bits_list:
        for suffix, ratio, kr, vr, dtype, scale_format in (grid[:3] if quick else grid):
            rows.append(dict(name=f"gear-{b}-{suffix}", method="gear", bits=b,
                             kw=dict(method="gear", bits=b, outlier_ratio=ratio, key_rank=kr, value_rank=vr,
                                     lowrank_dtype=dtype, scale_format=scale_format)))
    return rows


def make_factory(model, row):
    if row["method"] == "dynamic":  # transformers' DynamicCache in the model's dtype: the baseline
        return lambda: DynamicCache(config=model.config)
    if row["method"] == "hf_quantized_fp8":
        return lambda: QuantizedCache("fp8", model.config)
    if row["method"] == "hf_quantized":
        return lambda: QuantizedCache(row["backend"], model.config, nbits=row["bits"])
    settings = KVCacheSettings.build(**row["kw"])
    return lambda: GEARCache(model.config, settings)


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes held, key/value entries) for our caches, DynamicCache and transformers' QuantizedCache."""
    if isinstance(cache, GEARCache):
        return cache.nbytes()["total"], cache.num_elements()
    if isinstance(cache, QuantizedCache):
        return quantized_cache_bytes(cache)
    return dynamic_cache_bytes(cache)


@torch.no_grad()
def prefill_kv(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) of a prompt, from one forward with a DynamicCache (in chunks, to bound the memory)."""
    cache = DynamicCache(config=model.config)
    for s in range(0, ids.shape[1], 2048):
        model(ids[:, s:s + 2048], cache=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


def filled(factory, kv):
    """A cache holding the prefill: each layer's update gets the prompt's K/V, as in a model prefill."""
    cache = factory()
    for i, (k, v) in enumerate(kv):
        cache.update(k.clone(), v.clone(), i)
    return cache


@torch.no_grad()
def decode_seconds(model, cache, first: torch.Tensor, steps: int) -> float:
    """Median seconds per greedy decode step with `cache` (which already holds the context). With one torch thread
    on the CPU the clock is the process's CPU time (time spent waiting for a core on a shared machine not counted)."""
    clock = time.process_time if torch.get_num_threads() == 1 and first.device.type == "cpu" else time.perf_counter
    nxt, times = first, []
    for _ in range(steps):
        t0 = clock()
        out = model(nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        times.append(clock() - t0)
    return statistics.median(times)


def speed_ratio(model, factory, kv, first, steps: int, reps: int) -> tuple[float, object]:
    """Baseline (DynamicCache) step time / this cache's step time, interleaved repetitions; and the last cache."""
    base, ours, cache = [], [], None
    for _ in range(reps):
        base.append(decode_seconds(model, filled(lambda: DynamicCache(config=model.config), kv), first, steps))
        cache = filled(factory, kv)
        ours.append(decode_seconds(model, cache, first, steps))
    return statistics.median(base) / statistics.median(ours), cache


def context_ids(tok, n: int) -> torch.Tensor:
    ids = tok(builtin_text("builtin:heldout"), return_tensors="pt", verbose=False).input_ids
    return ids.repeat(1, n // ids.shape[1] + 1)[:, :n]


def run(args) -> list[dict]:
    # --only picks from every configuration (--quick then shortens the protocol, not the list)
    rows = configurations(args.quick and not args.only)
    if args.only:
        known = {r["name"] for r in rows}
        unknown = [n for n in args.only if n not in known]
        if unknown:  # a row the installed extras lack (hf-quanto-*, hf-hqq-*) was named by the skip line above
            raise CompressError(f"--only {' '.join(unknown)}: no such configuration; known: {', '.join(sorted(known))}")
        rows = [r for r in rows if r["name"] in args.only or r["method"] == "dynamic"]
    torch.manual_seed(0)
    model = compress.load(args.model, dtype=args.dtype)
    model.set_attn_implementation("gear_kv")
    tok = compress.load_tokenizer(args.model)
    if args.dtype == "bfloat16":  # the baseline cache holds the model's dtype
        rows[0].update(name="dynamic-bf16", bits=16)
    windows = heldout_windows(tok, builtin_text("builtin:heldout"), args.windows, args.window_len)
    seqs = copy_sequences(args.copy_num, args.copy_len, model.config.vocab_size)
    chunk = KVCacheSettings().residual_length
    contexts = {n: prefill_kv(model, context_ids(tok, n)) for n in (1024, 4096)}
    first = context_ids(tok, 4097)[:, -1:]
    memory_kv = prefill_kv(model, context_ids(tok, args.memory_context)) if args.memory_context else None
    fp16_bytes = None
    if memory_kv is not None:
        fp16_bytes = filled(lambda: DynamicCache(config=model.config), [(k.half(), v.half()) for k, v in memory_kv])
        fp16_bytes = cache_bytes(fp16_bytes)[0]
    reference = None
    out, results = [], {}
    for row in rows:
        t0 = time.perf_counter()
        factory = make_factory(model, row)
        # our caches' windows in one forward (kvcache/served.py: the chunked feed's logits; --chunked: the feed)
        one_pass = "kw" in row and not args.chunked
        q, reference = kv_quality(model, windows, factory, chunk, reference,
                                  settings=KVCacheSettings.build(**row["kw"]) if one_pass else None)
        results[row["name"]] = q
        res = {k: v for k, v in row.items() if k != "kw"}
        kw = row.get("kw", {})
        res.update(rank=max(kw.get("key_rank", 0), kw.get("value_rank", 0)), key_rank=kw.get("key_rank", 0),
                   value_rank=kw.get("value_rank", 0), outlier_ratio=kw.get("outlier_ratio", 0.0),
                   lowrank_dtype=kw.get("lowrank_dtype", "float16") if kw else None,
                   scale_format=kw.get("scale_format", "fp16") if kw else None,
                   value_bits=kw.get("value_bits") or row["bits"],
                   residual_length=chunk if kw else None, ppl=q.ppl, ppl_reference=q.ppl_reference,
                   ppl_delta_pct=q.ppl_delta_pct, ppl_delta_pct_ci95=q.ppl_delta_pct_ci95, kl=q.kl,
                   kl_ci95=q.kl_ci95, windows=q.windows, top1_agreement=q.top1_agreement,
                   copy_accuracy=copy_accuracy(model, seqs, factory, chunk))
        for n, kv in contexts.items():
            ratio, cache = speed_ratio(model, factory, kv, first, args.steps, args.reps)
            res[f"decode_speed_ratio_{n // 1024}k"] = ratio
            if n == 4096:
                nbytes, entries = cache_bytes(cache)
                res["bits_per_element"] = 8 * nbytes / entries  # read a few decode steps into the window's cycle
        if kw:  # ours: the mean over a whole cycle of the uncompressed window at 4k (compress inspect's figure)
            kv = kv_bytes_per_token(model.config, KVCacheSettings.build(**kw), tokens=4096)
            res["bits_per_element_cycle_mean"] = 16 * kv["compressed"] / kv["uncompressed"]
        if memory_kv is not None:
            res[f"kv_bytes_ratio_{args.memory_context // 1024}k"] = cache_bytes(filled(factory, memory_kv))[0] / fp16_bytes
        res["seconds"] = time.perf_counter() - t0
        out.append(res)
        print(f"[{row['name']}] done in {res['seconds']:.0f}s", file=sys.stderr)
    for a, b in args.compare or []:  # paired window by window: is a really below b?
        next(r for r in out if r["name"] == a)[f"vs_{b}"] = compare_caches(results[a], results[b])
    return out


def print_table(rows: list[dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    mem = f"kv_bytes_ratio_{args.memory_context // 1024}k" if args.memory_context else None
    cols = ["name", "bits_per_element", "bits_per_element_cycle_mean", "ppl_delta_pct", "ppl_ci", "kl", "kl_ci",
            "top1_agreement", "copy_accuracy", "decode_speed_ratio_1k", "decode_speed_ratio_4k"] + ([mem] if mem else [])
    heads = ["config", "bits/elem", "cycle mean", "ppl Δ%", "95% CI", "KL", "95% CI", "top-1", "copy acc", "speed 1k",
             "speed 4k"] + ([f"bytes {args.memory_context // 1024}k"] if mem else [])
    # the 95% intervals over windows (compress.evaluate.paired_change), as strings
    rows = [dict(r, ppl_ci=format_interval(r["ppl_delta_pct_ci95"], "+.2f"),
                 kl_ci=format_interval(r["kl_ci95"], ".4f")) for r in rows]
    table = Table(title=f"KV cache on {args.model} (ppl ref {rows[0]['ppl_reference']:.2f}; {args.windows} windows x "
                        f"{args.window_len} tokens; copy {args.copy_num} x {args.copy_len})")
    for h in heads:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*["-" if r.get(c) is None else r[c] if isinstance(r[c], str) else f"{r[c]:.4f}" if c == "kl"
                        else f"{r[c]:.3f}" for c in cols])
    Console(width=200).print(table)
    for r in rows:
        for key, c in r.items():
            if key.startswith("vs_"):
                print(f"{r['name']} {key.replace('_', ' ')}: KL x{c['kl_ratio']:.3f} "
                      f"{format_interval(c['kl_ratio_ci95'], '.3f')}, perplexity x{c['ppl_ratio']:.5f} "
                      f"{format_interval(c['ppl_ratio_ci95'], '.5f')} (95% CI over windows, paired)")


@torch.no_grad()
def long_context(n: int, device: str, names: list[str], model_name: str = "builtin:small") -> dict:
    """Feed an n-token context (chunks of 1024 tokens, each attending to the compressed past) through each named
    configuration, then time 16 decode steps: cache bytes, peak memory (GPU: allocator peak of that run), time,
    and ratios to the uncompressed DynamicCache (skipped on the CPU above 16k tokens)."""
    model = compress.load(model_name, device=device, dtype="float32")
    model.set_attn_implementation("gear_kv")
    ids = context_ids(compress.load_tokenizer(model_name), n).to(device)
    known = {r["name"]: r for r in configurations(False)}
    out = {"context": n, "device": device}
    for name in ["dynamic-fp32"] + [x for x in names if x != "dynamic-fp32"]:
        if name not in known:
            raise SystemExit(f"unknown configuration {name!r}; known: {', '.join(known)}")
        if name == "dynamic-fp32" and device == "cpu" and n > 16384:
            continue
        factory = make_factory(model, known[name])
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        cache, t0 = factory(), time.perf_counter()
        for s in range(0, n, 1024):
            logits = model(ids[:, s:s + 1024], cache=cache, use_cache=True, logits_to_keep=1).logits
        prefill = time.perf_counter() - t0
        step = decode_seconds(model, cache, logits[:, -1:].argmax(-1), 16)
        nbytes, entries = cache_bytes(cache)
        res = {"prefill_seconds": prefill, "decode_step_seconds": step, "cache_bytes": nbytes,
               "bits_per_element": 8 * nbytes / entries, "seq_length": cache.get_seq_length()}
        if device == "cuda":
            res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        out[name] = res
        del cache
    base = out.get("dynamic-fp32")
    for name in names:
        if base is not None and name in out and name != "dynamic-fp32":
            out[name]["decode_speed_ratio"] = base["decode_step_seconds"] / out[name]["decode_step_seconds"]
            out[name]["cache_bytes_ratio_fp32"] = out[name]["cache_bytes"] / base["cache_bytes"]
            if device == "cuda":
                out[name]["peak_gpu_ratio"] = out[name]["peak_gpu_bytes"] / base["peak_gpu_bytes"]
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def context_kv(model_name: str, tokens: int = 2048) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) of a held-out context, the model in float32 (the diagnostics' input)."""
    model = compress.load(model_name, dtype="float32")
    return prefill_kv(model, context_ids(compress.load_tokenizer(model_name), tokens))


def kivi_reconstruction(x: torch.Tensor, bits: int, axis: str, scale_format: str = "fp16") -> torch.Tensor:
    """x [B, H, T, D] quantized in the KIVI layout (chunks of 64 tokens, groups of 64, no outliers) and back."""
    from compress.kernels.kv_quant import quantize_pack, unpack_dequantize

    p = quantize_pack(x.reshape(*x.shape[:2], -1, 64, x.shape[-1]), bits, 64, axis, scale_format=scale_format)
    return unpack_dequantize(p).reshape(x.shape)


@torch.no_grad()
def scale_error(model_name: str = "builtin:small", bits_list=(2, 3, 4, 8)) -> list[dict]:
    """One-byte (log8) scales against fp16 min-max: the squared reconstruction error of the model's keys and values
    over a 2048-token held-out context (all layers, KIVI layout, groups of 64, no outliers), as a ratio."""
    kv = context_kv(model_name)
    out = []
    for kind, axis, idx in (("key", "token", 0), ("value", "channel", 1)):
        for bits in bits_list:
            err = {fmt: sum((kivi_reconstruction(layer[idx].float(), bits, axis, fmt) - layer[idx].float())
                            .square().sum().item() for layer in kv) for fmt in ("fp16", "log8")}
            out.append(dict(kind=kind, bits=bits, fp16_error=err["fp16"], log8_error=err["log8"],
                            log8_vs_fp16=err["log8"] / err["fp16"]))
    return out


@torch.no_grad()
def residual_spectrum(model_name: str = "builtin:small", spans=(64, 512, 2048), bits_list=(2, 4),
                      ranks=(1, 2, 4)) -> list[dict]:
    """Whether the model's keys/values have the structure GEAR's low-rank term needs: the share of the quantization
    residual's energy (KIVI layout, groups of 64, no outliers) in its top-r singular directions, per span length,
    averaged over layers, heads and spans of a 2048-token held-out context, beside the same share for Gaussian noise
    of the same shape (noise_topR): close to it, a rank-r term removes little more than it would from noise."""
    kv = context_kv(model_name)
    d = kv[0][0].shape[-1]
    out = []
    for kind, axis, idx in (("key", "token", 0), ("value", "channel", 1)):
        for bits in bits_list:
            res = []
            for layer in kv:
                x = layer[idx].float()
                res.append((x - kivi_reconstruction(x, bits, axis)).reshape(-1, x.shape[2], d))
            res = torch.cat(res)                                                   # [layers*B*H, T, D]
            for span in spans:
                sv2 = torch.linalg.svdvals(res.reshape(-1, span, d)) ** 2
                share = sv2.cumsum(-1) / sv2.sum(-1, keepdim=True)
                noise = torch.linalg.svdvals(torch.randn(64, span, d, generator=torch.Generator().manual_seed(0))) ** 2
                noise = noise.cumsum(-1) / noise.sum(-1, keepdim=True)                # Gaussian noise, same shape
                out.append(dict(kind=kind, bits=bits, span=span,
                                **{f"top{r}": share[:, r - 1].mean().item() for r in ranks},
                                **{f"noise_top{r}": noise[:, r - 1].mean().item() for r in ranks}))
    return out


PROTOCOL = {"windows": (6, 2), "window_len": (512, 192), "copy_num": (8, 2), "copy_len": (128, 96), "steps": (12, 4),
            "reps": (3, 1), "memory_context": (16384, 0)}  # flag: (default, with --quick)
PROTOCOL_FLAGS = (("--windows", positive_int, "held-out windows scored"),
                  ("--window-len", positive_int, "tokens per window, fed in chunks of 64"),
                  ("--copy-num", positive_int, "in-context copy examples"),
                  ("--copy-len", positive_int, "tokens each copy example repeats"),
                  ("--steps", positive_int, "decode steps timed per speed measurement"),
                  ("--reps", positive_int, "repetitions of each speed measurement"),
                  ("--memory-context", nonnegative_int, "context of the cache-bytes column (0: off)"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:small", help="reference model (builtin:tiny for quick runs)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the model's dtype for the quality and speed columns")
    ap.add_argument("--json", action="store_true", help="print a JSON list (one object per configuration)")
    ap.add_argument("--save-json", metavar="PATH", type=output_file, help="also write the JSON list to PATH (with the table on stdout)")
    ap.add_argument("--quick", action="store_true", help="fewer configurations, windows and steps (smoke test)")
    ap.add_argument("--chunked", action="store_true", help="score our caches by feeding each window through them in "
                    "chunks (the definition) instead of the one forward that gives the same logits (1.4-2x faster)")
    for flag, kind, meaning in PROTOCOL_FLAGS:
        full, quick = PROTOCOL[flag.strip("-").replace("-", "_")]
        ap.add_argument(flag, type=kind, default=None, help=f"{meaning} (default {full}; {quick} with --quick)")
    ap.add_argument("--device", default="cpu", type=check_device, choices=("cpu", "cuda"),
                    help="device of the --long check (cpu or cuda)")
    ap.add_argument("--only", nargs="*", help="only these configuration names (and the baseline); with --long: the "
                    "configurations to run (default gear-4-r2, the issue's GEAR-4 defaults)")
    ap.add_argument("--compare", nargs="+", default=[], metavar="A:B", type=config_pair,
                    help="pair two configurations window by window: A's KL and perplexity over B's, with 95%% "
                         "intervals (JSON: row A's vs_B)")
    ap.add_argument("--long", type=nonnegative_int, default=0, help="only run the long-context check at this many tokens")
    ap.add_argument("--residual-spectrum", action="store_true",
                    help="only print the singular-value decay of the quantization residual per span length")
    ap.add_argument("--scale-error", action="store_true",
                    help="only print the reconstruction error of one-byte scales relative to fp16 ones")
    args = ap.parse_args(argv)
    if args.scale_error:
        print(json.dumps(scale_error(args.model), indent=1))
        return
    if args.residual_spectrum:
        print(json.dumps(residual_spectrum(args.model), indent=1))
        return
    known = {r["name"] for r in configurations(False)}
    unknown = [n for n in args.only or () if n not in known]
    if unknown:  # before any work (--long ran its baseline first); hf-quanto-*/hf-hqq-* need their extras
        ap.error(f"--only {' '.join(unknown)}: no such configuration; known: {', '.join(sorted(known))}")
    if args.long:
        print(json.dumps(long_context(args.long, args.device, args.only or ["gear-4-r2"], args.model), indent=2))
        return
    for a, b in args.compare:
        if {a, b} - known:
            ap.error(f"--compare {a}:{b}: unknown configuration {sorted({a, b} - known)[0]!r}")
        if b == "dynamic-fp32":
            ap.error(f"--compare {a}:{b}: {b} is the reference (KL 0), a ratio to it is undefined; the row's own "
                     "columns already compare to it")
        if args.only is not None:  # both sides must run
            args.only += [x for x in (a, b) if x not in args.only]
        elif args.quick:
            ap.error("--compare with --quick needs --only (the quick list may not hold both sides)")
    fill_unset(args, PROTOCOL, args.quick)
    rows = run(args)
    if args.save_json:
        with open(args.save_json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, args)


if __name__ == "__main__":
    run_cli(main)

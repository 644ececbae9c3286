"""Linearization benchmark: the original model and its conversions (Liger GLA, Liger Attention hybrid, Liger GSA with
8 slots, Mixture-of-Memories with 4 memories, top-2, plus a shared one), one run, one table.

- quality, on a trained reference model (`--model`: builtin:small by default, the one that copies and finds pass
  keys, so those columns mean something; builtin:tiny for quick runs, where the original scores 0 on both; float32):
  held-out perplexity right after conversion (`ppl_converted`) and after LoRA recovery (`ppl_recovered`, from a
  checkpoint written by the recipe, e.g. `compress apply recipes/liger-hybrid.yaml`, given as
  `--recovered liger-hybrid=DIR`; the recover pass's tokens and
  minutes are read from its report.json; null when no checkpoint is given); KL(original || model) and top-1
  agreement of next-token distributions, of the recovered model when there is one, else of the converted one;
  `ppl_converted_ratio_ci95` / `ppl_recovered_ratio_ci95`: the perplexity ratio to the original with its 95%
  interval over the held-out windows (compress.evaluate.paired_change);
  copy and pass-key accuracy (compress.eval.probes). Recovery trains on in-distribution text, which can improve an
  under-trained original too; `--dense-recovered liger-gla=DIR` names a checkpoint of the *unconverted* model given
  the same recovery (a recipe with only the recover pass, same settings and tokens), and the row adds its
  perplexity (`ppl_dense_recovered`) and `ppl_recovered / ppl_dense_recovered`, the ratio that isolates what the
  conversion costs (`recovered_vs_dense_recovered_ci95`: its 95% interval over the windows).
- cache bytes: bytes held by the cache's tensors after a context of 1k, 8k and 32k tokens (DynamicCache K/V for the
  original; recurrent states + window ring buffers for ours).
- decode speed: tokens/s of one-token forward passes from a cache holding the context, as a ratio to the original
  with a DynamicCache (> 1: faster): per repetition the original and every variant run back to back, and the row
  gives the median of those paired ratios (`decode_speedup`) and their lowest and highest (`decode_speedup_range`,
  in parentheses in the table), all in this process. The reference model's
  context is 1024 tokens, so at 8k and 32k both models are random-init models with its shapes (speed does not
  depend on the weights); the caches are filled with random tensors of the right shapes (a 32k prefill on 2 CPU
  cores would take most of the run and changes nothing about the per-token cost).
- prefill speed: one forward pass over a prompt of 1k and 4k tokens into an empty cache, as a ratio to the original
  with a DynamicCache (`prefill_speedup`, `prefill_speedup_range`: paired per repetition, as decode's);
  `--skip-prefill` leaves it out.

- `--serving-shape --device cuda`: the speed and cache-bytes columns only (prefill too unless `--skip-prefill`), on
  a 2-layer random-init model with Llama-3-8B layer shapes (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336,
  vocabulary 128,256) in bf16 (fp32 on a CPU), `--batch` rows: the GPU row of the issue (each linearized layer
  decodes in one Triton launch).

    OMP_NUM_THREADS=1 python benchmarks/linearize.py [--json] [--recovered liger-hybrid=out/liger-hybrid ...]
    python benchmarks/linearize.py --json --serving-shape --device cuda [--batch 8]"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import compress
from compress.eval.probes import copy_probe, passkey_probe
from compress.evaluate import evaluate, heldout_windows
from compress.intervals import format_interval
from compress.linearize import LinearizedCache, LinearizedLayer, LinearizeSettings, cache_nbytes, linearize_model
from compress.linearize.convert import attention_modules
from compress.pass_api import storage_bytes
from compress.progress import progress_bar
from compress.bench_args import int_at_least, positive_int, run_cli  # noqa: E402

VARIANTS = {"liger-gla": LinearizeSettings(variant="gla"), "liger-hybrid": LinearizeSettings(variant="hybrid"),
            "liger-gsa": LinearizeSettings(variant="gla", gate="gsa", num_slots=8),
            "mom": LinearizeSettings(variant="mom", num_memories=4, top_k=2),
            # GLA's state size: one gated delta-rule memory (MoM with a single memory and no shared one)
            "mom-1": LinearizeSettings(variant="mom", num_memories=1, top_k=1, shared_memory=False),
            # not Liger's: the recurrent branch divided by phi(q) . z (LinearizeSettings.normalize)
            "liger-gla-normalized": LinearizeSettings(variant="gla", normalize=True),
            "liger-hybrid-normalized": LinearizeSettings(variant="hybrid", normalize=True),
            # the window branch weighted up (Liger's alpha/beta are recipe settings; 0.5/0.5 by default)
            "liger-hybrid-normalized-a0.3": LinearizeSettings(variant="hybrid", normalize=True, alpha=0.3, beta=0.7)}
CONTEXTS = (1024, 8192, 32768)
PREFILL_CONTEXTS = (1024, 4096)
# one Llama-3-8B layer (the GPU row: speed does not depend on the weights)
SERVING_LAYER = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     intermediate_size=14336, vocab_size=128256)


def heldout_text() -> str:
    return (Path(compress.__file__).parent / "builtin" / "tiny" / "heldout.txt").read_text()


def quality(model, original, windows, tokenizer, args) -> dict:
    ev = evaluate(model, windows, original, progress=False)
    # the perplexity ratio to the original with its 95% interval over the windows (each window paired with the
    # original's NLL on it)
    return {"perplexity": ev["perplexity"], "ppl_ratio_ci95": ev["ppl_ratio_ci95"], "kl": ev["kl"],
            "top1": ev["top1_agreement"],
            "copy": copy_probe(model, span_len=args.copy_len, num=args.probe_num),
            "passkey": passkey_probe(model, tokenizer, heldout_text(), context_len=args.passkey_len,
                                     num=args.probe_num)}


def recovered_info(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").exists() else {}
    for p in report.get("passes", []):
        if p.get("name") == "recover":
            d = p.get("details", {})
            return {"tokens": d.get("tokens"), "minutes": round(p.get("seconds", 0) / 60, 2), "details": d}
    return {"tokens": None, "minutes": None}


def serving_model(device: str, dtype: torch.dtype, layers: int = 2):
    """A random-init Llama with Llama-3-8B layer shapes, for contexts up to 32k."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SERVING_LAYER, num_hidden_layers=layers, max_position_embeddings=max(CONTEXTS),
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def filled_dynamic_cache(model, context: int, batch: int = 1) -> DynamicCache:
    cfg, p = model.config, next(model.parameters())
    cache = DynamicCache(config=cfg)
    shape = (batch, cfg.num_key_value_heads, context, cfg.head_dim)
    for i in range(cfg.num_hidden_layers):
        cache.update(torch.randn(shape, device=p.device, dtype=p.dtype),
                     torch.randn(shape, device=p.device, dtype=p.dtype), i)
    return cache


def filled_linearized_cache(model, context: int, batch: int = 1) -> LinearizedCache:
    cfg, cache, device = model.config, LinearizedCache(model), next(model.parameters()).device
    modules = attention_modules(model)
    for i, layer in enumerate(cache.layers):
        # float32 as the cache keeps it: GLA [B, Hkv, K, V]; MoM [B, M+1, Hkv, K, V]; GSA [B, Hkv, M, K+V]
        state = torch.randn(modules[i][1].state_shape(batch), device=device)
        if isinstance(layer, LinearizedLayer) and layer.window:
            kv = torch.randn(batch, cfg.num_key_value_heads, layer.window - 1, cfg.head_dim, device=device)
            layer.store(state, kv, kv.clone(), torch.ones(batch, layer.window - 1, dtype=torch.bool, device=device),
                        new_tokens=layer.window - 1)
            layer.cumulative_length = context
        else:
            layer.store(state, new_tokens=context)
    return cache


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_seconds(model, cache, steps: int, batch: int = 1) -> float:
    device = next(model.parameters()).device
    ids = torch.randint(100, model.config.vocab_size, (batch, 1), device=device)
    model(ids, cache=cache)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        model(ids, cache=cache)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def selected(args) -> dict[str, LinearizeSettings]:
    return {name: s for name, s in VARIANTS.items() if not args.only or name in args.only}


BOUND = "bound (projections only)"


def _projections_only(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """An attention layer that runs its q/k/v/o projections and nothing between them (its output is meaningless):
    the decoding speed no replacement of softmax attention that keeps these projections can exceed, since the rest
    of the model (MLP, norms, head) costs both models the same."""
    b, t, _ = hidden_states.shape
    q, k, v = self.project(hidden_states)
    out = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # [B, Hq, T, V]: the shape o_proj reads
    return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None


def bound_model(reference):
    """A copy of `reference` whose attention layers run `_projections_only` (state in a LinearizedCache: unused)."""
    model = copy.deepcopy(reference)
    linearize_model(model, LinearizeSettings(variant="gla"))
    for _, module in attention_modules(model).values():
        module.forward = types.MethodType(_projections_only, module)
    return model


def models_for(reference, models: dict, ctx: int, args) -> tuple:
    """(base model, {"original": base, variant: converted}) able to run `ctx` tokens, in `args.speed_dtype`: beyond
    the reference model's positions a random-init model of its shapes (speed does not depend on the weights); built
    once per base. `args.bound` adds the BOUND row (bound_model)."""
    dtype = args.speed_dtype
    if ctx > reference.config.max_position_embeddings:
        cfg = copy.deepcopy(reference.config)
        cfg.max_position_embeddings = ctx
        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        models = {}
    elif next(reference.parameters()).dtype != dtype:  # (a copy: the quality rows keep the float32 model)
        reference = copy.deepcopy(reference).to(dtype)
        models = {}
    if not models:
        p = next(reference.parameters())
        models = {"original": reference}
        for name, settings in selected(args).items():
            models[name] = copy.deepcopy(reference)
            linearize_model(models[name], settings)
            models[name].to(device=p.device, dtype=p.dtype)  # new parameters (router, beta map) follow
        if args.bound:
            models[BOUND] = bound_model(reference)
    return reference, models


def paired_speedups(times: dict[str, list[float]]) -> dict[str, tuple[float, list[float]]]:
    """{name: (median, [lowest, highest])} of the original's time over the model's, paired per repetition (the
    original and every variant ran back to back: a burst of the host's noise moves one repetition's ratio, not
    the median; the spread says how much it moved)."""
    out = {}
    for name, ts in times.items():
        ratios = [a / b for a, b in zip(times["original"], ts)]
        out[name] = (round(statistics.median(ratios), 2), [round(min(ratios), 2), round(max(ratios), 2)])
    return out


@torch.no_grad()
def prefill_seconds(model, context: int, batch: int, linearized: bool) -> float:
    """One forward over `context` new tokens into an empty cache (what a prompt costs), last position's logits."""
    device = next(model.parameters()).device
    ids = torch.randint(100, model.config.vocab_size, (batch, context), device=device)
    cache = LinearizedCache(model) if linearized else DynamicCache(config=model.config)
    _sync(device)
    t0 = time.perf_counter()
    model(ids, cache=cache, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - t0


def prefill_speed(reference, args) -> dict[str, dict]:
    """{name: {"prefill_speedup": {ctx: ratio}, "prefill_speedup_range": {ctx: [lo, hi]}}}, as decode's."""
    out, models = {}, {}
    for ctx in progress_bar(PREFILL_CONTEXTS, description="prefill speed"):
        reference, models = models_for(reference, models, ctx, args)
        for m in models.values():  # warm-up (first-call allocations, kernel builds)
            prefill_seconds(m, min(ctx, 128), args.batch, m is not models["original"])
        times = {name: [] for name in models}
        for _ in range(args.reps):
            for name, m in models.items():
                times[name].append(prefill_seconds(m, ctx, args.batch, name != "original"))
        for name, (ratio, spread) in paired_speedups(times).items():
            out.setdefault(name, {}).setdefault("prefill_speedup", {})[str(ctx)] = ratio
            out[name].setdefault("prefill_speedup_range", {})[str(ctx)] = spread
        print(f"[prefill {ctx}] " + ", ".join(f"{n} {out[n]['prefill_speedup'][str(ctx)]}x" for n in models),
              file=sys.stderr)
    return out


def speed_and_bytes(reference, args) -> dict[str, dict]:
    """{variant: {"cache_bytes": {ctx: bytes}, "decode_speedup": {ctx: ratio}, "prefill_speedup": ...}} plus the
    original's bytes."""
    out = {name: {"cache_bytes": {}, "decode_speedup": {}}
           for name in ["original", *selected(args), *([BOUND] if args.bound else [])]}
    if not args.skip_prefill:
        for name, values in prefill_speed(reference, args).items():
            out[name].update(values)
    batch = args.batch
    models = {}
    for ctx in progress_bar(CONTEXTS, description="decode speed"):
        reference, models = models_for(reference, models, ctx, args)
        times = {name: [] for name in models}
        for _ in range(args.reps):  # interleaved, fresh cache each repetition
            for name, m in models.items():
                cache = filled_dynamic_cache(m, ctx, batch) if name == "original" else \
                    filled_linearized_cache(m, ctx, batch)
                times[name].append(decode_seconds(m, cache, args.steps, batch))
                nbytes = (storage_bytes([t for layer in cache.layers for t in (layer.keys, layer.values)])
                          if name == "original" else cache_nbytes(cache)["total"])
                out[name]["cache_bytes"][str(ctx)] = nbytes
                del cache
        base_t = statistics.median(times["original"])
        for name, (ratio, spread) in paired_speedups(times).items():
            out[name]["decode_speedup"][str(ctx)] = ratio
            out[name].setdefault("decode_speedup_range", {})[str(ctx)] = spread
            if name == "original":
                out[name]["decode_tokens_per_s"] = out[name].get("decode_tokens_per_s", {})
                out[name]["decode_tokens_per_s"][str(ctx)] = round(batch / base_t, 1)
        # a line per context as it completes: a run cut by a timeout still leaves what it measured
        print(f"[decode {ctx}] " + ", ".join(f"{n} {out[n]['decode_speedup'][str(ctx)]}x" for n in models),
              file=sys.stderr)
    return out


def run(args) -> list[dict]:
    torch.manual_seed(0)
    if args.serving_shape:  # speed and bytes only, at Llama-3-8B layer shapes
        perf = speed_and_bytes(serving_model(args.device, args.speed_dtype), args)
        shape = "2 layers of Llama-3-8B (hidden 4096, 32/8 heads x 128, MLP 14336), random weights"
        return [{"variant": name, "device": args.device, "batch": args.batch, "shape": shape,
                 "speed_dtype": args.speed_dtype_name, **values} for name, values in perf.items()]
    original = compress.load(args.model, dtype="float32")  # builtin:small is stored in bf16
    tokenizer = compress.load_tokenizer(args.model)
    windows = heldout_windows(tokenizer, seq_len=args.seq_len, max_windows=args.windows)
    recovered = dict(item.split("=", 1) for item in args.recovered)
    dense_recovered = dict(item.split("=", 1) for item in args.dense_recovered)
    if args.skip_quality:
        perf = speed_and_bytes(original, args)
        return [{"variant": name, "speed_dtype": args.speed_dtype_name, **values} for name, values in perf.items()]
    rows = []
    ev = evaluate(original, windows, None, progress=False)
    rows.append({"variant": "original", "perplexity": ev["perplexity"], "kl": 0.0, "top1": 1.0,
                 "copy": copy_probe(original, span_len=args.copy_len, num=args.probe_num),
                 "passkey": passkey_probe(original, tokenizer, heldout_text(), context_len=args.passkey_len,
                                          num=args.probe_num)})
    for name, settings in progress_bar(list(selected(args).items()), description="variants"):
        converted = copy.deepcopy(original)
        linearize_model(converted, settings)
        q = quality(converted, original, windows, tokenizer, args)
        row = {"variant": name, "ppl_converted": q["perplexity"], "ppl_recovered": None,
               "ppl_converted_ratio_ci95": q["ppl_ratio_ci95"], "recovery_tokens": None, "recovery_minutes": None,
               "kl_converted": q["kl"], "top1_converted": q["top1"]}
        if name in recovered:
            folder = Path(recovered[name])
            rec = compress.load(folder, dtype="float32")
            qr = quality(rec, original, windows, tokenizer, args)
            info = recovered_info(folder)
            row.update(ppl_recovered=qr["perplexity"], ppl_recovered_ratio_ci95=qr["ppl_ratio_ci95"],
                       recovery_tokens=info["tokens"],
                       recovery_minutes=info["minutes"], kl=qr["kl"], top1=qr["top1"], copy=qr["copy"],
                       passkey=qr["passkey"], recovered_from=str(folder))
            if name in dense_recovered:  # the unconverted model with the same recovery: the fair denominator
                # (scored as the baseline of the recovered model, window by window: the ratio's 95% interval)
                paired = evaluate(rec, windows, compress.load(dense_recovered[name], dtype="float32"),
                                  progress=False)
                control = paired["baseline_perplexity"]
                row.update(ppl_dense_recovered=control, recovered_vs_dense_recovered=qr["perplexity"] / control,
                           recovered_vs_dense_recovered_ci95=paired["ppl_ratio_ci95"],
                           dense_recovered_from=dense_recovered[name])
        else:
            row.update(kl=q["kl"], top1=q["top1"], copy=q["copy"], passkey=q["passkey"],
                       note="no recovered checkpoint given (--recovered NAME=DIR): ppl_recovered is null")
        rows.append(row)
    if not args.skip_speed:
        perf = speed_and_bytes(original, args)
        for row in rows:
            row.update(perf[row["variant"]], speed_dtype=args.speed_dtype_name)
        if args.bound:
            rows.append({"variant": BOUND, **perf[BOUND]})
    for row in rows:
        row["protocol"] = (f"{windows.shape[0]} held-out windows of {args.seq_len} tokens; copy {args.probe_num}x"
                           f"{args.copy_len}; passkey {args.probe_num} prompts of {args.passkey_len} tokens; decode "
                           f"{args.steps} steps x {args.reps} reps, prefill {args.reps} reps, contexts > "
                           f"{original.config.max_position_embeddings} on random-init models of the same shapes")
    return rows


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def speedup(ratio, spread) -> str:
    """The median paired ratio and, over the repetitions, its lowest and highest."""
    if ratio is None:
        return "-"
    return f"{ratio:.2f}" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread and spread[0] != spread[1] else "")


def print_table(rows: list[dict], model: str) -> None:
    import shutil

    from rich.console import Console
    from rich.table import Table

    columns = ("variant", "ppl", "ppl converted", "ppl recovered", "x original (95% CI)", "vs dense recovered",
               "recovery", "KL", "top-1", "copy", "passkey",
               *(f"cache MiB {c // 1024}k" for c in CONTEXTS), *(f"decode x {c // 1024}k" for c in CONTEXTS),
               *(f"prefill x {c // 1024}k" for c in PREFILL_CONTEXTS))
    cells = []
    for r in rows:
        rec = (f"{r['recovery_tokens']} tok / {r['recovery_minutes']} min"
               if r.get("recovery_minutes") is not None else "-")
        cb, ds, spread = r.get("cache_bytes", {}), r.get("decode_speedup", {}), r.get("decode_speedup_range", {})
        ps, pspread = r.get("prefill_speedup", {}), r.get("prefill_speedup_range", {})
        # of the last stage measured
        ci = r["ppl_recovered_ratio_ci95"] if r.get("ppl_recovered") is not None else r.get("ppl_converted_ratio_ci95")
        cells.append([r["variant"], fmt(r.get("perplexity"), ".2f"), fmt(r.get("ppl_converted"), ".2f"),
                      fmt(r.get("ppl_recovered"), ".2f"), format_interval(ci, ".3f") if "ppl_converted" in r else "-",
                      fmt(r.get("recovered_vs_dense_recovered"), ".2f"), rec, fmt(r.get("kl"), ".4f"),
                      fmt(r.get("top1")), fmt(r.get("copy")), fmt(r.get("passkey"), ".2f"),
                      *(fmt(cb.get(str(c), 0) / 2**20, ".2f") if cb else "-" for c in CONTEXTS),
                      *(speedup(ds.get(str(c)), spread.get(str(c))) if ds else "-" for c in CONTEXTS),
                      *(speedup(ps.get(str(c)), pspread.get(str(c))) if ps else "-" for c in PREFILL_CONTEXTS)])
    # only the columns this run measured (--skip-quality / --skip-speed leave whole columns empty)
    keep = [i for i in range(len(columns)) if i == 0 or any(row[i] != "-" for row in cells)]
    t = Table(title=f"Linearization ({model})")
    for i in keep:
        t.add_column(columns[i], justify="right")
    for row in cells:
        t.add_row(*(str(row[i]) for i in keep))
    # piped output has no terminal width: rich would squeeze the table into 80 columns
    Console(width=None if shutil.get_terminal_size((0, 0)).columns else 200).print(t)
    print(rows[0].get("protocol", "decode speed and cache bytes only"))


def check_made_from_the_model(ap, args) -> None:
    """A recovered checkpoint is scored against --model: one made from another model (a builtin:tiny recipe's output
    beside the default builtin:small) printed that model's perplexity, KL and top-1 as its own, with nothing said."""
    from compress.cli_eval import source_record
    from compress.errors import CompressError
    from compress.models import resolve_model_path

    # as source_record gives it: the builtin name, or the resolved folder
    want = args.model if args.model.startswith("builtin:") else str(resolve_model_path(args.model).resolve())
    for option, items in (("--recovered", args.recovered), ("--dense-recovered", args.dense_recovered)):
        for item in items:
            try:
                source, found = source_record(Path(item.partition("=")[2]))
            except CompressError:  # not a checkpoint: its load says so, in one line
                continue
            if source and found != want:
                ap.error(f"{option} {item}: that checkpoint was made from {source}, not from --model {args.model}, "
                         f"whose scores it would be compared with: pass --model {found or source}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    ap.add_argument("--model", default="builtin:small", help="the reference model (builtin:tiny: quicker, but it "
                    "cannot copy or find pass keys)")
    ap.add_argument("--recovered", nargs="*", default=[], metavar="NAME=DIR",
                    help="recovered checkpoints, e.g. liger-hybrid=out/liger-hybrid liger-gla=out/liger-gla")
    ap.add_argument("--dense-recovered", nargs="*", default=[], metavar="NAME=DIR",
                    help="the unconverted model recovered with NAME's recovery settings (a recipe with only the "
                         "recover pass): adds ppl_dense_recovered and recovered_vs_dense_recovered to NAME's row")
    ap.add_argument("--windows", type=positive_int, default=16, help="held-out windows for perplexity / KL")
    ap.add_argument("--seq-len", type=int_at_least(2), default=256)
    ap.add_argument("--copy-len", type=positive_int, default=64)
    ap.add_argument("--probe-num", type=positive_int, default=8)
    ap.add_argument("--passkey-len", type=positive_int, default=512)
    ap.add_argument("--steps", type=positive_int, default=8, help="decode steps timed per repetition")
    ap.add_argument("--reps", type=positive_int, default=3)
    ap.add_argument("--skip-speed", action="store_true", help="no cache-bytes / decode / prefill speed columns")
    ap.add_argument("--skip-prefill", action="store_true", help="no prefill-speed columns")
    ap.add_argument("--skip-quality", action="store_true", help="only the cache-bytes / decode-speed columns")
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS), help="these variants (and the original) only")
    ap.add_argument("--serving-shape", action="store_true",
                    help="decode speed and cache bytes only, on 2 random layers of Llama-3-8B's shapes")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="with --serving-shape")
    ap.add_argument("--batch", type=positive_int, default=1, help="rows decoded at once (with --serving-shape)")
    ap.add_argument("--speed-dtype", choices=("float32", "bfloat16"), default=None,
                    help="the models' dtype in the speed columns (default: float32 on a CPU, bfloat16 on CUDA; the "
                         "quality columns are always float32)")
    ap.add_argument("--bound", action="store_true",
                    help=f"add the row '{BOUND}': attention layers that run only their q/k/v/o projections, the "
                         "decode speedup no attention replacement keeping them can exceed")
    args = ap.parse_args(argv)
    args.speed_dtype_name = args.speed_dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.speed_dtype = getattr(torch, args.speed_dtype_name)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if (args.device != "cpu" or args.batch != 1) and not args.serving_shape:
        ap.error("--device and --batch go with --serving-shape (quality runs on the CPU, batch 1)")
    if args.batch < 1:
        ap.error("--batch must be >= 1")
    for option, items in (("--recovered", args.recovered), ("--dense-recovered", args.dense_recovered)):
        for item in items:
            name, sep, folder = item.partition("=")
            if not sep or name not in VARIANTS or not Path(folder).is_dir():
                ap.error(f"{option} {item}: expected NAME=DIR with NAME one of {', '.join(VARIANTS)} and DIR a "
                         "checkpoint folder")
    missing = {i.split("=", 1)[0] for i in args.dense_recovered} - {i.split("=", 1)[0] for i in args.recovered}
    if missing:
        ap.error(f"--dense-recovered {', '.join(sorted(missing))}: give that variant's --recovered checkpoint too")
    check_made_from_the_model(ap, args)
    if args.skip_speed and (args.skip_quality or args.serving_shape):
        ap.error("--skip-speed with " + ("--serving-shape" if args.serving_shape else "--skip-quality")
                 + " leaves nothing to measure; drop one of them")
    if not (args.skip_quality or args.serving_shape):
        from compress.models import context_length

        context = context_length(compress.load(args.model, meta=True).config)  # as `compress eval` refuses
        for option, value, tokens in (("--seq-len", args.seq_len, args.seq_len),
                                      ("--passkey-len", args.passkey_len, args.passkey_len),
                                      ("--copy-len", args.copy_len, 2 * args.copy_len)):  # (the span, then again)
            if context is not None and tokens > context:
                ap.error(f"{option} {value}: {tokens} tokens, longer than {args.model}'s context ({context} tokens)")
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        dtype = args.speed_dtype_name
        print_table(rows, f"Llama-3-8B layer shapes, {args.device} {dtype}, batch {args.batch}" if args.serving_shape
                    else f"{args.model}, CPU; quality float32, speed {dtype}")


if __name__ == "__main__":
    run_cli(main)

"""Scoring text through a compressed KV cache (`compress eval`'s suite and probes on a `gear_kv` model): the
chunked path (the text fed through a GEARCache in chunks of residual_length, what the scores mean) against the same
logits from one forward (kvcache/served.py), with the dense forward for scale, in one process.

    python benchmarks/kv_served_logits.py [--model builtin:small] [--batch 4] [--tokens 1024] [--repeats 2]
                                          [--dtype auto] [--json]

Per cache setting: seconds of each path (best of --repeats), one-pass speed-up over chunked, its cost over the dense
forward, and the largest logit difference between the two paths next to the largest difference that compression
itself makes (dense vs chunked): a flipped code here and there (round-off in the projections moves a value across a
quantization step) is the whole of the first; the mean NLL of both paths is printed too."""
from __future__ import annotations

import argparse
import json
import time

import torch

from compress.bench_args import int_at_least, positive_int, run_cli

SETTINGS = {
    "KIVI-2": dict(method="kivi", bits=2),
    "KIVI-4": dict(method="kivi", bits=4),
    "GEAR-4 (rank 2/2, 2% outliers)": dict(method="gear", bits=4),
    "GEAR-2 (rank 2/2, 2% outliers)": dict(method="gear", bits=2),
}


def best_of(repeats: int, fn):
    seconds, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
    return min(seconds), out


def nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))


def main(argv=None) -> None:
    from compress.kvcache import GEARCache, KVCacheSettings, use_compressed_attention

    # shorter texts stay (nearly) whole in the uncompressed window: every row would show no compression
    least = max(KVCacheSettings.build(**kw).residual_length + KVCacheSettings.build(**kw).group_size
                for kw in SETTINGS.values())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--tokens", type=int_at_least(least), default=1024,
                        help=f"tokens per row, at least {least} (the uncompressed window and one compressed chunk)")
    parser.add_argument("--repeats", type=positive_int, default=2)
    parser.add_argument("--dtype", default="auto", help="compute dtype (compress.load's dtype=)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import compress
    from compress.kvcache.quality import chunked_logits
    from compress.kvcache.served import served_logits

    model = use_compressed_attention(compress.load(args.model, dtype=args.dtype).eval())
    tokenizer = compress.load_tokenizer(args.model)
    from compress.calibration import builtin_text

    ids = tokenizer(builtin_text("builtin:heldout"), return_tensors="pt", verbose=False).input_ids
    ids = ids[:, : args.batch * args.tokens]
    if ids.shape[1] < args.batch * args.tokens:
        parser.error(f"the held-out text has {ids.shape[1]} tokens, fewer than --batch x --tokens "
                     f"({args.batch * args.tokens})")
    ids = ids.view(args.batch, args.tokens)
    rows = []
    with torch.no_grad():
        dense_s, dense = best_of(args.repeats, lambda: model(input_ids=ids, use_cache=False).logits.float())
        for name, kwargs in SETTINGS.items():
            s = KVCacheSettings.build(**kwargs)
            chunked_s, chunked = best_of(args.repeats, lambda: chunked_logits(
                model, ids, lambda: GEARCache(model.config, s), s.residual_length))
            served_s, served = best_of(args.repeats, lambda: served_logits(model, ids, s))
            rows.append({"setting": name, "dense_s": dense_s, "chunked_s": chunked_s, "one_pass_s": served_s,
                         "speedup_vs_chunked": chunked_s / served_s, "cost_vs_dense": served_s / dense_s,
                         "max_logit_diff": float((served - chunked).abs().max()),
                         "max_logit_diff_compression": float((dense - chunked).abs().max()),
                         "nll_chunked": nll(chunked, ids), "nll_one_pass": nll(served, ids),
                         "nll_dense": nll(dense, ids)})
            r = rows[-1]
            if not args.json:
                print(f"{name:32s} chunked {r['chunked_s']:6.2f} s  one pass {r['one_pass_s']:6.2f} s  "
                      f"{r['speedup_vs_chunked']:5.2f}x faster, {r['cost_vs_dense']:4.2f}x dense ({dense_s:.2f} s)  "
                      f"max |dlogit| {r['max_logit_diff']:.1e} (compression: {r['max_logit_diff_compression']:.1e})  "
                      f"NLL {r['nll_chunked']:.5f} / {r['nll_one_pass']:.5f} (dense {r['nll_dense']:.5f})", flush=True)
    if args.json:
        print(json.dumps({"model": args.model, "batch": args.batch, "tokens": args.tokens,
                          "dtype": str(dense.dtype).removeprefix("torch."), "rows": rows}))


if __name__ == "__main__":
    run_cli(main)

"""KV-cache bytes held on a sliding-window model, by context length: transformers' own cache (a sliding layer keeps
window - 1 tokens) against a GEARCache (a sliding layer drops each whole page that has left the window), and the same
model with its window removed (full attention: both grow with the context).

Bytes are measured, not computed (compress.budget.kv_bytes_per_token: random keys/values of the model's shapes
appended to one layer of each kind, the tensors it then holds counted, times the layers; the compressed figure is
the mean over one cycle of its fp16 window). Default shapes: Mistral-7B-v0.1's attention (32 layers, 8 KV heads of
128, sliding window 4096), batch 1, fp16 baseline.

    python benchmarks/kv_sliding_memory.py [--window 4096] [--tokens 4096 8192 32768] [--json]
"""
from __future__ import annotations

import argparse
import json

from compress.bench_args import positive_int, run_cli

CACHES = {"kivi-4": dict(method="kivi", bits=4),
          "gear-4-k1": dict(bits=4, key_rank=1, value_rank=0, outlier_ratio=0.0)}


def mistral_config(window: int | None, layers: int):
    from transformers import AutoConfig

    return AutoConfig.for_model("mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                sliding_window=window)


def rows(window: int, tokens_list: list[int], layers: int) -> list[dict]:
    from compress.budget import kv_bytes_per_token
    from compress.kvcache.config import KVCacheSettings

    out = []
    for attention, w in (("sliding", window), ("full", None)):
        config = mistral_config(w, layers)
        for name, kw in CACHES.items():
            for tokens in tokens_list:
                kv = kv_bytes_per_token(config, KVCacheSettings.build(**kw), tokens=tokens)
                out.append(dict(attention=attention, window=w, cache=name, tokens=tokens,
                                transformers_bytes=round(kv["uncompressed"] * tokens),
                                ours_bytes=round(kv["compressed"] * tokens),
                                ratio=kv["compressed"] / kv["uncompressed"]))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=positive_int, default=4096, help="the sliding window (tokens)")
    ap.add_argument("--tokens", type=positive_int, nargs="+", default=[4096, 8192, 32768], help="context lengths")
    ap.add_argument("--layers", type=positive_int, default=32, help="decoder layers (bytes scale with them)")
    ap.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    args = ap.parse_args(argv)
    table = rows(args.window, args.tokens, args.layers)
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(f"{'attention':<10}{'cache':<11}{'tokens':>8}{'transformers MB':>17}{'ours MB':>10}{'ratio':>8}")
    for r in table:
        print(f"{r['attention']:<10}{r['cache']:<11}{r['tokens']:>8}{r['transformers_bytes'] / 1e6:>17.1f}"
              f"{r['ours_bytes'] / 1e6:>10.1f}{r['ratio']:>8.3f}")


if __name__ == "__main__":
    run_cli(main)

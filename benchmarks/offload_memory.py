"""Peak memory of compressing a model whole vs with decoder layers left on disk (compress.load(max_memory=...)).

A random Llama (default 16 layers, hidden 1024, MLP 2816, 4 KV heads: ~197M parameters, 0.39 GB in bf16 on disk,
0.79 GB in fp32 in memory) is written as a plain Hugging Face folder; then, each in a fresh process, the same recipe
(magnitude 2:4, or Wanda 2:4 with calibration) is applied and saved, once with the whole model in memory and once
with `max_memory`. Reported: the peak resident set size of each process (ru_maxrss: bytes actually held,
including torch itself), wall time, and whether the two checkpoints are identical tensor for tensor.

    python benchmarks/offload_memory.py [--layers 16] [--hidden 1024] [--max-memory 200MB] [--method wanda] [--json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compress.bench_args import positive_int, run_cli

WORKER = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
import compress
src, out, method, cap = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
kwargs = {"max_memory": cap} if cap != "none" else {}
start = time.time()
model = compress.load(src, dtype="float32", **kwargs)
calibration = {"source": "builtin:calibration", "num_samples": 8, "seq_len": 128} if method == "wanda" else None
compress.apply(model, [compress.passes.Prune(method=method, structure="2:4")], calibration=calibration,
               tokenizer=compress.load_tokenizer("builtin:tiny"), progress=False)
compress.save(model, out)
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "seconds": time.time() - start}))
"""


def hidden_size(text: str) -> int:
    """An argparse type: the attention layout (heads of 64, one KV head per 256) needs a multiple of 256."""
    value = positive_int(text)
    if value % 256:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 256 (heads of 64, a KV head per 256)")
    return value


def build(folder: Path, layers: int, hidden: int, intermediate: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                         head_dim=64, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run(src: Path, out: Path, method: str, cap: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", WORKER, str(src), str(out), method, cap],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=positive_int, default=16, help="decoder layers of the random Llama")
    ap.add_argument("--hidden", type=hidden_size, default=1024,
                    help="hidden size, a multiple of 256 (heads of 64; a KV head per 256)")
    ap.add_argument("--intermediate", type=positive_int, default=2816, help="MLP width")
    ap.add_argument("--max-memory", default="200MB", help="the load's memory cap (layers past it stay on disk)")
    ap.add_argument("--method", choices=["magnitude", "wanda"], default="wanda", help="the prune pass's method")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.max_memory != "none":
        from compress.offload import parse_bytes

        parse_bytes(args.max_memory)  # a bad size: one line, exit 2 (before the subprocesses)
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = build(tmp / "src", args.layers, args.hidden, args.intermediate)
        t = time.time()
        whole = run(tmp / "src", tmp / "whole", args.method, "none")
        capped = run(tmp / "src", tmp / "capped", args.method, args.max_memory)
        a, b = (load_file(tmp / d / "model.safetensors") for d in ("whole", "capped"))
        identical = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    rows = [{"run": "in memory", "max_memory": None, **whole},
            {"run": "layers on disk", "max_memory": args.max_memory, **capped}]
    result = {"parameters": params, "fp32_weight_bytes": params * 4, "method": args.method, "rows": rows,
              "peak_ratio": capped["peak_rss"] / whole["peak_rss"], "identical_checkpoints": identical,
              "seconds_total": time.time() - t}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{params / 1e6:.0f}M parameters ({params * 4 / 1e9:.2f} GB in fp32), prune {args.method} 2:4")
    print(f"{'run':<16}{'max_memory':>12}{'peak RSS':>12}{'seconds':>10}")
    for r in rows:
        print(f"{r['run']:<16}{str(r['max_memory'] or '-'):>12}{r['peak_rss'] / 1e9:>10.2f}GB{r['seconds']:>10.1f}")
    print(f"peak RSS ratio (on disk / in memory): {result['peak_ratio']:.2f}; checkpoints identical: {identical}")


if __name__ == "__main__":
    run_cli(main)

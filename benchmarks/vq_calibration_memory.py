"""vq_logits' calibration step at a real vocabulary, the old way beside the new in one process: the forward with
the head run and every position's hidden state kept, then sampled (before 2026-12-04), against `head_inputs` (the
forward stopped at the head's input, the sampled rows gathered batch by batch). Random 2-layer Llama (hidden 1024,
Llama 3's 128256-token vocabulary; random weights: only memory and time are measured), bf16, 16 x 512 calibration
tokens, 4096 rows kept. Peak: VmHWM above the resident memory before each step (Linux), glibc's mmap threshold held
at 1 MB so that freed blocks leave (as they would at 7B sizes). The rows must be identical.

    python benchmarks/vq_calibration_memory.py [--new-first] [--json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

from compress.bench_args import run_cli

HIDDEN, VOCAB, KEEP = 1024, 128256, 4096


def kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def old_way(model, batches) -> torch.Tensor:
    captured = []
    hook = model.lm_head.register_forward_hook(
        lambda m, inp, out: captured.append(inp[0].detach().reshape(-1, HIDDEN).float()))
    for i in range(0, batches.shape[0], 8):
        model(input_ids=batches[i:i + 8], use_cache=False)
    hook.remove()
    hidden = torch.cat(captured)
    return hidden[torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(0))[:KEEP]]


def new_way(model, batches) -> torch.Tensor:
    from compress.vq_logits.calibration import head_inputs

    return head_inputs(model, model.lm_head, batches, keep=KEEP, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-first", action="store_true", help="measure the new way first (order effects)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # (read by glibc at start: rerun with it set)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"})
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4096, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    batches = torch.randint(0, VOCAB, (16, 512), generator=torch.Generator().manual_seed(1))
    ways = [("old", old_way), ("new", new_way)]
    rows, rows_kept = {}, {}
    for name, way in ways[::-1] if args.new_first else ways:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss, start = kb("VmRSS"), time.perf_counter()
        with torch.no_grad():
            rows_kept[name] = way(model, batches)
        rows[name] = {"peak_mb": (kb("VmHWM") - rss) * 1024 / 1e6, "seconds": time.perf_counter() - start}
    result = {**rows, "same_rows": torch.equal(rows_kept["old"], rows_kept["new"]),
              "peak_ratio_new_vs_old": rows["new"]["peak_mb"] / rows["old"]["peak_mb"],
              "speedup_new_vs_old": rows["old"]["seconds"] / rows["new"]["seconds"]}
    if args.json:
        print(json.dumps(result))
        return
    for name in ("old", "new"):
        print(f"{name}: peak {rows[name]['peak_mb']:.0f} MB above the model, {rows[name]['seconds']:.2f} s")
    print(f"new/old peak {result['peak_ratio_new_vs_old']:.2f}x, {result['speedup_new_vs_old']:.2f}x faster, "
          f"same rows: {result['same_rows']}")


if __name__ == "__main__":
    run_cli(main)

"""Memory the passes add beyond the model, and how it grows with depth: what decides whether a 7B model fits.

Builds random-init Llamas (hidden 1024, MLP 4096, 8192-token vocabulary; random weights: only memory and time are
measured) of 4 and 8 decoder layers, stored in bf16, and runs each pass on each in a fresh subprocess. Reported per
pass: the peak resident memory during `compress.apply` (or, for the export rows, during the export of the
compressed model) above the resident memory once the model was loaded (the
kernel's high-water mark, VmHWM, reset after the load through /proc/self/clear_refs), the anonymous memory still
held after it, and the growth of that peak per decoder layer between the two depths, as a multiple of one layer's
own bytes at the compute dtype. A pass that works one layer at a time grows by about its output per layer; one that
holds every layer's temporaries grows by several layers' bytes per layer, and on a 32-layer model that is what
does not fit.

    python benchmarks/pass_memory.py [--layers 4 8] [--passes NAME ...] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from compress.bench_args import positive_int, run_cli

CALIBRATION = '{"source": "builtin:calibration", "num_samples": 8, "seq_len": 256}'
PASSES = {
    "prune magnitude 50% packed": "[Prune(method='magnitude', sparsity=0.5, storage='packed')]",
    "prune wanda 50% packed": "[Prune(method='wanda', sparsity=0.5, storage='packed')]",
    "prune wanda 50% dense-stored": "[Prune(method='wanda', sparsity=0.5, storage='dense')]",
    "quantize gptq int4 g128": "[get_pass('quantize')(method='gptq', bits=4, group_size=128)]",
    "vq_logits (1024 codes, scale/bias)": "[get_pass('vq_logits')(num_codes=1024, kmeans_iterations=4)]",
    "activation_sparsity (2 outer steps)": "[get_pass('activation_sparsity')(target_ppl_increase=0.05, outer_steps=2, "
                                           "inner_steps=8, search_tokens=2048)]",
}
RECOVER = ("[Prune(method='magnitude', sparsity=0.5, storage='packed'), get_pass('recover')(targets=['re:.*_proj$'], "
           "max_tokens=4096, batch_size=4{})]")
PASSES.update({
    "prune 50% packed + recover (LoRA r8, 4 steps)": RECOVER.format(""),
    "  the same, micro_batch_size 1": RECOVER.format(", micro_batch_size=1"),
    "  the same, gradient_checkpointing": RECOVER.format(", gradient_checkpointing=True"),
})
# steps measured after unmeasured set-up passes: the compressed-tensors export of a compressed model (50 MB shards, so
# that a shard is a fraction of the model at these sizes as a 5 GB shard is at 7B)
EXPORT = ("export(model, sys.argv[2] + '/out', max_shard_bytes='50MB')", "from compress.export.compressed_tensors "
          "import export; compress.apply(model, {}, calibration={}, tokenizer=tokenizer, progress=False)")
STEPS = {
    "export compressed-tensors (of rtn int4 g128)": "[get_pass('quantize')(method='rtn', bits=4, group_size=128)]",
    "export compressed-tensors (of magnitude 2:4 packed)": "[Prune(method='magnitude', structure='2:4', "
                                                           "storage='packed')]",
}
PROBE = """
import gc, json, sys, time
import compress
from compress import get_pass
from compress.prune import Prune

def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

model = compress.load(sys.argv[1])
tokenizer = compress.load_tokenizer("builtin:tiny")
{setup}
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here on: what apply adds
rss, anon = kb("VmRSS"), kb("RssAnon")
start = time.perf_counter()
{step}
seconds = time.perf_counter() - start
gc.collect()
print(json.dumps({{"peak_kb": kb("VmHWM") - rss, "anon_kb": kb("RssAnon") - anon, "seconds": seconds,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}}))
"""


def build(folder: Path, layers: int) -> int:
    """Save the model; return one decoder layer's parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=8192, hidden_size=1024, intermediate_size=4096,
                                  num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.model.layers[0].parameters())


def measure(folder: Path, name: str) -> dict:
    if name in PASSES:
        step, setup = f"compress.apply(model, {PASSES[name]}, calibration={CALIBRATION}, tokenizer=tokenizer, " \
                      "progress=False)", ""
    else:
        step, setup = EXPORT[0], EXPORT[1].format(STEPS[name], CALIBRATION)
    code = PROBE.format(step=step, setup=setup)
    # glibc returns a freed block to the system only above its mmap threshold, which rises to 32 MB as blocks are
    # freed: at these shapes most temporaries fall under it and freed heap stays resident, at 7B shapes most are
    # above it. Held at 1 MB, the small model's figures are live memory, as the large model's would be
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, "-c", code, str(folder), out], capture_output=True, text=True,
                              env=env)
    if proc.returncode:
        raise SystemExit(f"error: the probe failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=positive_int, nargs=2, default=[4, 8], metavar=("FEW", "MORE"),
                        help="two model depths, the first smaller: the growth per layer is their difference")
    parser.add_argument("--passes", nargs="+", choices=sorted({**PASSES, **STEPS}), default=[*PASSES, *STEPS],
                        metavar="NAME")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    few, more = args.layers
    if few >= more:
        parser.error(f"--layers {few} {more}: the first depth must be smaller than the second")
    rows = []
    header = f"{'pass':48s} {'peak ' + str(few):>8s} {'peak ' + str(more):>8s} {'per layer':>9s} {'in layers':>9s} " \
             f"{'held':>6s} {'s at ' + str(more):>7s}"
    with tempfile.TemporaryDirectory() as tmp:
        folders = {n: Path(tmp) / f"m{n}" for n in (few, more)}
        layer_params = [build(folder, n) for n, folder in folders.items()][0]
        if not args.json:
            print(f"decoder layer: {layer_params / 1e6:.1f}M parameters; peaks in MB above the loaded model, at {few} "
                  f"and {more} layers; 'in layers': the growth per layer over one layer's own bytes", flush=True)
            print(header, flush=True)
        for name in args.passes:
            runs = {n: measure(folder, name) for n, folder in folders.items()}
            dtype = runs[more]["dtype"]
            layer_mb = layer_params * (4 if dtype == "float32" else 2) / 1e6
            # VmHWM and RssAnon are in KiB: MB here are 10^6 bytes, as everywhere in compress
            peak = {n: r["peak_kb"] * 1024 / 1e6 for n, r in runs.items()}
            per_layer = (peak[more] - peak[few]) / (more - few)
            rows.append({"pass": name, "dtype": dtype, "layer_mb": layer_mb,
                         "peak_mb": {str(n): p for n, p in peak.items()},
                         "held_anon_mb": runs[more]["anon_kb"] * 1024 / 1e6,
                         "peak_growth_per_layer_mb": per_layer, "growth_in_layers": per_layer / layer_mb,
                         "seconds": {str(n): r["seconds"] for n, r in runs.items()}})
            r = rows[-1]
            if not args.json:  # row by row: a long run shows what it has
                print(f"{name:48s} {peak[few]:>8.0f} {peak[more]:>8.0f} {per_layer:>9.0f} "
                      f"{r['growth_in_layers']:>9.2f} {r['held_anon_mb']:>6.0f} {r['seconds'][str(more)]:>7.1f}",
                      flush=True)
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"(one layer: {rows[0]['layer_mb']:.0f} MB at {rows[0]['dtype']}, the compute dtype)")


if __name__ == "__main__":
    run_cli(main)

"""Peak memory of loading a model: plain transformers vs compress.load with each dtype choice, and checkpoints
that shrink (int4, 50% packed).

Builds a random-init Llama of ~88M parameters stored in bf16 (176 MB on disk; random weights: only memory is
measured), the same weights as a native compressed checkpoint (a gear_kv pass: no weight changes), and two
compressed ones of the same model (round-to-nearest int4 in groups of 128; 50% magnitude pruning, packed), then
loads them in fresh subprocesses and reports each one's peak resident memory during the load minus its resident
memory before it, so the figure is what the load itself costs. The peak is the kernel's high-water mark (VmHWM),
reset before the load (/proc/self/clear_refs): a plain ru_maxrss would keep the imports' own peak and hide any
load smaller than it. The base is taken after importing transformers' modeling code (`modeling_utils` and the
Llama model: ~209 MiB resident on first import, torch.distributed, sympy, scipy, which every loader pays once per
process and no loader's weights). Resident memory counts the file pages a memory-mapped safetensors load touches:
transformers keeps the file mapped and reads a page when a forward first touches it, so "held after" (once the
load returned) can be below the weights' bytes, and "after a forward" (one 16-token forward, no grad) is what a
model that has run holds.

    python benchmarks/load_memory.py [--json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from compress.bench_args import run_cli

# name -> (the folder's suffix, the load run on it as P)
LOADERS = {
    "transformers from_pretrained (bf16)": ("", "from transformers import AutoModelForCausalLM as A; import torch; "
                                                "m = A.from_pretrained(P, dtype=torch.bfloat16)"),
    "compress.load dtype=stored (bf16)": ("", "import compress; m = compress.load(P, dtype='stored')"),
    "compress.load dtype=auto": ("", "import compress; m = compress.load(P)"),
    "compress.load dtype=float32": ("", "import compress; m = compress.load(P, dtype='float32')"),
    # the same weights as a native compressed checkpoint (a gear_kv pass changes none): compress's own loader, which
    # read the whole state dict before copying it in (2x the weights at the peak) and now a decoder layer at a time
    "compress.load native checkpoint (stored)": ("-native", "import compress; m = compress.load(P, dtype='stored')"),
    # checkpoints that shrink: what their loaded model holds against their files
    "compress.load int4 rtn g128 (stored)": ("-w4", "import compress; m = compress.load(P, dtype='stored')"),
    "compress.load 50% packed (stored)":
        ("-mag50", "import compress; m = compress.load(P, dtype='stored', sparse_runtime='packed')"),
    "compress.load 50% auto runtime (stored)": ("-mag50", "import compress; m = compress.load(P, dtype='stored')"),
}
FORWARD = ("with torch.no_grad(): m(torch.randint(0, 8000, (1, 16)))\n"
           "gc.collect()\n"
           "print(kb('VmRSS') - base)")
PROBE = """
import sys, gc
import torch, transformers, compress, compress.checkpoint
{preload}
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
P = sys.argv[1]
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current resident size
base = kb("VmRSS")
{code}
gc.collect()
dtype = str(next(m.parameters()).dtype).removeprefix("torch.")
print(kb("VmHWM") - base, kb("VmRSS") - base, dtype)
{after}
"""
# transformers' modeling code, imported before the base: its first import is ~209 MiB resident whoever loads
PRELOAD = "import transformers.modeling_utils, transformers.models.llama.modeling_llama"


def probe(code: str, *, after: str = "", preload: str = PRELOAD) -> str:
    """The script a row runs in its own process: prints peak and held KiB above the base, the dtype, then `after`'s
    output."""
    return PROBE.format(code=code, after=after, preload=preload)


def build(folder: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=8192, hidden_size=768, intermediate_size=2048,
                                  num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    import compress

    params = sum(p.numel() for p in model.parameters())
    compress.apply(model, [compress.get_pass("gear_kv")(method="kivi", bits=4)], progress=False)
    compress.save(model, Path(f"{folder}-native"))
    for suffix, step in {"w4": compress.get_pass("quantize")(method="rtn", bits=4, group_size=128),
                         "mag50": compress.get_pass("prune")(method="magnitude", sparsity=0.5)}.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        compress.apply(model, [step], progress=False)
        compress.save(model, Path(f"{folder}-{suffix}"))
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m"
        params = build(folder)
        disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        rows = {}
        for name, (suffix, code) in LOADERS.items():
            target = Path(f"{folder}{suffix}")
            out = subprocess.run([sys.executable, "-c", probe(code, after=FORWARD), str(target)],
                                 capture_output=True, text=True, check=True).stdout.split()
            # ru_maxrss and VmRSS are in KiB: MB here are 10^6 bytes, as on the disk line and everywhere in compress
            rows[name] = {"peak_mb": int(out[0]) * 1024 / 1e6, "held_mb": int(out[1]) * 1024 / 1e6, "dtype": out[2],
                          "after_forward_mb": int(out[3]) * 1024 / 1e6,
                          "files_mb": sum(f.stat().st_size for f in target.glob("*.safetensors")) / 1e6}
    result = {"parameters": params, "disk_mb": disk / 1e6, "loads": rows}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{params / 1e6:.1f}M parameters, {disk / 1e6:.0f} MB on disk (bf16)")
    print(f"{'loader':40s} {'dtype':>9s} {'files MB':>9s} {'peak MB':>8s} {'held after':>11s} "
          f"{'after a forward':>16s}")
    for name, r in rows.items():
        print(f"{name:40s} {r['dtype']:>9s} {r['files_mb']:>9.0f} {r['peak_mb']:>8.0f} {r['held_mb']:>11.0f} "
              f"{r['after_forward_mb']:>16.0f}")


if __name__ == "__main__":
    run_cli(main)

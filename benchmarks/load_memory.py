"""Peak memory of loading a model: plain transformers vs compress.load with each dtype choice.

Builds a random-init Llama of ~88M parameters stored in bf16 (176 MB on disk; random weights: only memory is
measured), and the same weights as a native compressed checkpoint (a gear_kv pass: no weight changes), then loads
them in fresh subprocesses and reports each one's peak resident memory during the load minus its resident memory
after the imports, so the figure is what the load itself costs. The peak is the kernel's
high-water mark (VmHWM), reset after the imports (/proc/self/clear_refs): a plain ru_maxrss would keep the
imports' own peak and hide any load smaller than it. Resident memory counts the file pages a memory-mapped
safetensors load touches; the "held after" column is what stays resident once the load returned.

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

LOADERS = {
    "transformers from_pretrained (bf16)":
        "from transformers import AutoModelForCausalLM as A; import torch; m = A.from_pretrained(P, dtype=torch.bfloat16)",
    "compress.load dtype=stored (bf16)": "import compress; m = compress.load(P, dtype='stored')",
    "compress.load dtype=auto": "import compress; m = compress.load(P)",
    "compress.load dtype=float32": "import compress; m = compress.load(P, dtype='float32')",
    # the same weights as a native compressed checkpoint (a gear_kv pass changes none): compress's own loader, which
    # read the whole state dict before copying it in (2x the weights at the peak) and now a decoder layer at a time
    "compress.load native checkpoint (stored)": "import compress; m = compress.load(P + '-native', dtype='stored')",
}
PROBE = """
import sys, gc
import torch, transformers, compress, compress.checkpoint
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
"""


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

    compress.apply(model, [compress.get_pass("gear_kv")(method="kivi", bits=4)], progress=False)
    compress.save(model, Path(f"{folder}-native"))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m"
        params = build(folder)
        disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        rows = {}
        for name, code in LOADERS.items():
            out = subprocess.run([sys.executable, "-c", PROBE.format(code=code), str(folder)], capture_output=True,
                                 text=True, check=True).stdout.split()
            # ru_maxrss and VmRSS are in KiB: MB here are 10^6 bytes, as on the disk line and everywhere in compress
            rows[name] = {"peak_mb": int(out[0]) * 1024 / 1e6, "held_mb": int(out[1]) * 1024 / 1e6, "dtype": out[2]}
    result = {"parameters": params, "disk_mb": disk / 1e6, "loads": rows}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{params / 1e6:.1f}M parameters, {disk / 1e6:.0f} MB on disk (bf16)")
    print(f"{'loader':40s} {'dtype':>9s} {'peak MB above imports':>22s} {'held after':>11s}")
    for name, r in rows.items():
        print(f"{name:40s} {r['dtype']:>9s} {r['peak_mb']:>22.0f} {r['held_mb']:>11.0f}")


if __name__ == "__main__":
    run_cli(main)

"""Peak memory where logits over a large vocabulary and long prompts dominate: evaluation, a recovery step, a prompt's
prefill (dense vs linearized).

Random-weight models built here (only memory is measured): a 2-layer Llama with Llama-3's vocabulary (128,256;
hidden 256, so that the logits dwarf the weights) and a 4-layer Llama with 8 KV heads of 128 (hidden 1024) and its
GLA conversion (`linearize`, no recovery). Each row runs in its own process; peak = the resident high-water mark
above the imports (as benchmarks/load_memory.py, but with transformers' modeling code imported inside the measured
part: the protocol these rows were first recorded with), beside what the whole-logit paths held at least
(`floor_mb`):
- eval: `compress.evaluate.evaluate` of the model against itself on W windows of L tokens (the whole-logit path
  held both models' float32 logits of a batch of 8 windows: floor = 2 x min(W, 8) x L x vocab x 4 bytes);
- recover: one step of a `recover` pass (LoRA, KL to the original) on one 2,048-token window (the whole-logit loss
  held 3 float32 copies of the logits and the KL 4 more: floor = 7 x L x vocab x 4);
- prefill: `generate` of one token after a prompt of `--context` tokens, dense (its KV cache grows) vs GLA (a
  constant state), and their ratio.

    OMP_NUM_THREADS=1 python benchmarks/long_context_memory.py [--context 16384] [--json]   # ~6 minutes

(`--context`: the prefill rows' prompt; the eval and recover rows keep their sizes.)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from load_memory import probe  # noqa: E402

from compress.bench_args import positive_int, run_cli  # noqa: E402

VOCAB = 128256
EVAL = "from compress.evaluate import evaluate; import torch; m = compress.load(P, dtype='float32'); " \
       "w = torch.randint(0, 8000, ({windows}, {length}), generator=torch.Generator().manual_seed(0)); " \
       "evaluate(m, w, m, progress=False)"
RECOVER = "from compress.calibration import CalibrationSpec; m = compress.load(P, dtype='float32'); " \
          "compress.apply(m, [compress.get_pass('recover')(max_tokens=2048, kl_weight=1.0, batch_size=1, " \
          "seq_len=2048)], calibration=CalibrationSpec(source='builtin:calibration', num_samples=2, seq_len=2048), " \
          "tokenizer=compress.load_tokenizer('builtin:tiny'), progress=False)"
PREFILL = "m = compress.load(P, dtype='float32'); ids = torch.randint(10, 8000, (1, {context})); " \
          "m.generate(ids, max_new_tokens=1, do_sample=False)"


def build(folder: Path) -> tuple[Path, Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import compress

    tokenizer = compress.load_tokenizer("builtin:tiny")
    shapes = {"vocab128k": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=64, vocab_size=VOCAB),
              "kv_heavy": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                               num_key_value_heads=8, head_dim=128, vocab_size=8192)}
    for name, shape in shapes.items():
        torch.manual_seed(0)
        config = LlamaConfig(**shape, max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=0,
                             eos_token_id=0, pad_token_id=0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    gla = compress.load(folder / "kv_heavy", dtype="float32")
    compress.apply(gla, [compress.get_pass("linearize")(variant="gla", gate="gla", layers="all")], progress=False)
    compress.save(gla, folder / "gla", tokenizer=tokenizer)
    return folder / "vocab128k", folder / "kv_heavy", folder / "gla"


def peak(code: str, path: Path) -> float:
    """MB above the imports at the peak of `code` run on the model at `path`, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", probe(code, preload=""), str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"a row failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.split()[0]) * 1024 / 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=positive_int, default=16384, help="prefill rows: prompt tokens")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    folder = Path(tempfile.mkdtemp())
    try:
        vocab, dense, gla = build(folder)
        rows = []
        for windows, length in ((2, 2048), (1, 8192)):
            floor = 2 * min(windows, 8) * length * VOCAB * 4 / 1e6
            rows.append(dict(row="eval", windows=windows, tokens=length, vocab=VOCAB, floor_mb=floor,
                             peak_mb=peak(EVAL.format(windows=windows, length=length), vocab)))
        rows.append(dict(row="recover", windows=1, tokens=2048, vocab=VOCAB, floor_mb=7 * 2048 * VOCAB * 4 / 1e6,
                         peak_mb=peak(RECOVER, vocab)))
        prefill = {name: peak("import torch; " + PREFILL.format(context=args.context), path)
                   for name, path in (("dense", dense), ("gla", gla))}
        rows.append(dict(row="prefill", tokens=args.context, dense_peak_mb=prefill["dense"],
                         gla_peak_mb=prefill["gla"], gla_vs_dense=prefill["gla"] / prefill["dense"]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(rows))
        return
    for r in rows:
        if r["row"] == "prefill":
            print(f"prefill {r['tokens']} tokens: dense {r['dense_peak_mb']:.0f} MB, GLA {r['gla_peak_mb']:.0f} MB "
                  f"({r['gla_vs_dense']:.2f}x)")
        else:
            print(f"{r['row']:8s} {r['windows']} x {r['tokens']} tokens, vocabulary {r['vocab']}: peak "
                  f"{r['peak_mb']:.0f} MB above the imports (whole logits held at least {r['floor_mb']:.0f} MB)")


if __name__ == "__main__":
    run_cli(main)

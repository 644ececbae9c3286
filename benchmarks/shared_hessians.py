"""Input statistics shared by the Linears that read one tensor (q/k/v, gate/up) vs one accumulator per Linear, the
way the passes accumulated them before: time of a SparseGPT or GPTQ pass, and the accumulators held per layer.

Random-init Llama (hidden and MLP width below, 8192-token vocabulary; random weights: only time is measured), one
process, the two ways interleaved per repetition; the weights they produce are the same bits
(tests/test_shared_input_statistics.py).

    OMP_NUM_THREADS=1 python benchmarks/shared_hessians.py [--hidden 2048] [--mlp 5632] [--method sparsegpt] [--json]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

from compress.bench_args import positive_int, run_cli


def one_per_module(step, modules, make):
    """One accumulator per Linear, each reading its own input (the passes before 2026-12-05)."""
    accs = {n: make(m) for n, m in modules.items()}
    step.run({m: (lambda acc: lambda module, inputs, output: acc.add(inputs[0]))(accs[n]) for n, m in modules.items()})
    return accs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=positive_int, default=2048)
    ap.add_argument("--mlp", type=positive_int, default=5632)
    ap.add_argument("--layers", type=positive_int, default=2)
    ap.add_argument("--samples", type=positive_int, default=16, help="calibration windows of --seq-len tokens")
    ap.add_argument("--seq-len", type=positive_int, default=512)
    ap.add_argument("--method", choices=("sparsegpt", "gptq"), default="sparsegpt")
    ap.add_argument("--reps", type=positive_int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.hidden % 64:
        ap.error(f"--hidden {args.hidden}: a multiple of 64 (heads of 64)")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import compress
    import compress.hessian as hessian
    import compress.prune.pass_ as prune_pass
    import compress.quantize.pass_ as quantize_pass

    config = AutoConfig.for_model("llama", vocab_size=8192, hidden_size=args.hidden, intermediate_size=args.mlp,
                                  num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                  num_key_value_heads=max(1, args.hidden // 256))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tokenizer = compress.load_tokenizer("builtin:tiny")
    calibration = {"source": "builtin:calibration", "num_samples": args.samples, "seq_len": args.seq_len}
    step = (compress.get_pass("prune")(method="sparsegpt", sparsity=0.5) if args.method == "sparsegpt"
            else compress.get_pass("quantize")(method="gptq", bits=4, group_size=128))
    ways = {"one per Linear": one_per_module, "shared": hessian.input_statistics}
    seconds, held = {w: [] for w in ways}, {}
    for _ in range(args.reps):
        for way, fn in ways.items():
            def counting(s, modules, make, fn=fn, way=way):
                accs = fn(s, modules, make)
                held[way] = len({id(a) for a in accs.values()})
                return accs
            prune_pass.input_statistics = quantize_pass.input_statistics = counting
            model = copy.deepcopy(base)
            start = time.perf_counter()
            compress.apply(model, [step], tokenizer=tokenizer, calibration=calibration, progress=False)
            seconds[way].append(time.perf_counter() - start)
    prune_pass.input_statistics = quantize_pass.input_statistics = hessian.input_statistics
    median = {w: statistics.median(t) for w, t in seconds.items()}
    result = {"method": args.method, "hidden": args.hidden, "mlp": args.mlp, "tokens": args.samples * args.seq_len,
              "seconds": {w: round(t, 2) for w, t in median.items()}, "accumulators_per_layer": held,
              "speedup": round(median["one per Linear"] / median["shared"], 3)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.method}, hidden {args.hidden}, MLP {args.mlp}, {result['tokens']} calibration tokens:")
    for way in ways:
        print(f"  {way:15s} {median[way]:8.1f} s  {held[way]} accumulators a layer")
    print(f"  shared: {result['speedup']}x")


if __name__ == "__main__":
    run_cli(main)

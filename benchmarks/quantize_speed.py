"""Weight-quantized layers against dense ones when decoding on the CPU, in one process (ratio > 1 = ours faster).

    OMP_NUM_THREADS=1 python benchmarks/quantize_speed.py [--json] [--quick]

Rows (`kind`):
- quantized_linear: a QuantizedLinear (round-to-nearest codes, groups of 128, symmetric) at Llama-3-8B's shapes
  (4096x4096, 14336x4096, 4096x14336) vs nn.Linear of the same dtype, 1 / 4 / 16 / 64 tokens: `speedup_vs_dense`
  for what the layer runs (`path`: the C product of the packed codes, kernels/csrc/qgemv.c, up to 16 tokens in
  float32 and 4 in bf16; above, the weight dequantized by one C pass, then a dense matmul),
  `torch_path_speedup_vs_dense` for the torch reference's dequantize-then-matmul (COMPRESS_KERNELS=torch; what
  every call ran before, timed at 1 token only: it is slow). `rel_err`: the C
  product against the float64 product of the dequantized weight. float32 rows, and bfloat16 rows where the CPU
  computes bf16 natively (what `dtype: auto` loads a bf16 checkpoint in there).
- pruned_quantized_linear: the same shapes pruned 2:4 then quantized to int4 (recipes/2of4-w4.yaml's layout: the
  kept codes and their positions) vs the dense layer of the same dtype (float32, and bf16 where the CPU computes it
  natively); `path`: the C product of the kept codes (kernels/csrc/qsparse.c; bf16 x with AVX512-BF16,
  csrc/qgemv_bf16.c) up to 8 tokens (bf16: 16), blocks of rows dequantized in C for torch's GEMM above;
  `torch_path_*` at 1 token: what every call ran before (the float weight rebuilt through temporaries).
- e2e_decode: builtin:tiny through recipes' round-to-nearest int4 / int8 pass (and 2:4 magnitude pruning then
  int4) vs the unquantized model, greedy decoding of 32 tokens after 256, tokens/s.
One torch thread; each layer is timed over enough weight copies (called in turn) that one cycle reads more than 3x the
CPU's largest cache, paired with the dense layer (sparse_speed.py's timer)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from activation_sparse_rows import cycling, largest_cache_bytes  # noqa: E402
from vq_logits import paired_median_seconds  # noqa: E402

from compress.kernels.dispatch import forced_kernels  # noqa: E402
from compress.quantize import QuantizedLinear  # noqa: E402
from compress.quantize.int_quant import quantize_rtn  # noqa: E402
from compress.bench_args import run_cli  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (out, in)
GROUP = 128


def quantized(out_f: int, in_f: int, bits: int, dtype, seed: int) -> tuple[nn.Linear, QuantizedLinear]:
    """A dense layer and its round-to-nearest quantization (the first copy, whose error is reported)."""
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=False, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
    codes, scales, zeros = quantize_rtn(dense.weight, bits, GROUP, True, dtype)
    return dense, QuantizedLinear.from_codes(codes, scales, zeros, bits=bits, group_size=GROUP, dtype=dtype)


def random_copy(q: QuantizedLinear) -> QuantizedLinear:
    """Another layer of q's layout with random codes and scales (speed does not depend on the values; quantizing
    hundreds of copies would take minutes)."""
    other = QuantizedLinear(q.in_features, q.out_features, bits=q.bits, group_size=q.group_size,
                            dtype=q.weight_scale.dtype)
    other.weight_packed.random_(0, 256)
    other.weight_scale.uniform_(1e-3, 2e-3)
    return other


@torch.no_grad()
def layer_rows(dtypes, tokens_list, repeats: int) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for out_f, in_f in SHAPES:
            for bits in (4, 8):
                # as many copies as make one cycle read > 3x the largest cache (cache-cold, like a real model's
                # many layers): an int4 4096x4096 layer is 8.4 MB, a 480 MB L3 would hold dozens of them
                copies = math.ceil(3 * largest_cache_bytes() / (out_f * in_f * bits / 8))
                dense, q = quantized(out_f, in_f, bits, dtype, 0)
                layers = [q] + [random_copy(q) for _ in range(copies - 1)]
                dense_copies = [dense] + [nn.Linear(in_f, out_f, bias=False, dtype=dtype) for _ in range(
                    math.ceil(3 * largest_cache_bytes() / (out_f * in_f * dtype.itemsize)) - 1)]
                for t in tokens_list:
                    x = torch.randn(t, in_f, dtype=dtype)
                    exact = x.double() @ q.dequantized_weight(torch.float32).double().t()
                    err = float((q(x).double() - exact).abs().max() / exact.abs().max())
                    d, s = paired_median_seconds([cycling([lambda f=f: f(x) for f in dense_copies]),
                                                  cycling([lambda f=f: f(x) for f in layers])],
                                                 repeats if t <= 16 else 3)
                    row = dict(device="cpu", kind="quantized_linear", shape=f"{out_f}x{in_f}", bits=bits,
                               dtype=str(dtype).removeprefix("torch."), tokens=t, dense_ms=d * 1e3, ours_ms=s * 1e3,
                               speedup_vs_dense=d / s, path=q.runtime_path(t), rel_err=err, weight_copies=copies)
                    if t == 1:  # the dequantize-then-matmul path: ~0.5 s a call at these shapes, a few calls
                        with forced_kernels("torch"):
                            slow = min(timed(lambda: q(x)) for _ in range(2))
                        row["torch_path_ms"] = slow * 1e3
                        row["torch_path_speedup_vs_dense"] = d / slow
                    rows.append(row)
                    print(f"[{row['dtype']} int{bits} {row['shape']} x{t}] {d * 1e3:.1f} / {s * 1e3:.1f} ms = "
                          f"{d / s:.2f}x", file=sys.stderr)
                del layers, dense_copies
    return rows


@torch.no_grad()
def pruned_rows(tokens_list, repeats: int, bits: int = 4, dtype=torch.float32) -> list[dict]:
    """A layer pruned 2:4 then quantized (recipes/2of4-w4.yaml's layout: kept codes + 2-bit positions) vs the dense
    layer of the same dtype: the C product of the kept codes (kernels/csrc/qsparse.c; bf16 x on AVX512-BF16 CPUs
    csrc/qgemv_bf16.c) up to 8 tokens (bf16: 16), blocks of rows dequantized in C for torch's GEMM above;
    `torch_path_*`: what every call ran before (the float weight rebuilt)."""
    rows = []
    for out_f, in_f in SHAPES:
        g = torch.Generator().manual_seed(0)
        dense = nn.Linear(in_f, out_f, bias=False, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
        scores = torch.rand(out_f, in_f // 4, 4, generator=g)
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, -1).indices, True)
        mask = mask.view(out_f, in_f)
        codes, scales, zeros = quantize_rtn(dense.weight * mask, bits, GROUP, True, dtype)
        q = QuantizedLinear.from_codes(codes, scales, zeros, bits=bits, group_size=GROUP, mask=mask, nm=(2, 4),
                                       dtype=dtype)
        copies = math.ceil(3 * largest_cache_bytes() / (out_f * in_f * (bits / 16 + 0.125)))
        layers = [q] + [_random_pruned_copy(q) for _ in range(copies - 1)]
        dense_copies = [dense] + [nn.Linear(in_f, out_f, bias=False, dtype=dtype) for _ in range(
            math.ceil(3 * largest_cache_bytes() / (out_f * in_f * dtype.itemsize)) - 1)]
        for t in tokens_list:
            x = torch.randn(t, in_f).to(dtype)
            exact = x.double() @ q.dequantized_weight(torch.float64).t()
            err = float((q(x).double() - exact).abs().max() / exact.abs().max())
            d, s = paired_median_seconds([cycling([lambda f=f: f(x) for f in dense_copies]),
                                          cycling([lambda f=f: f(x) for f in layers])], repeats if t <= 16 else 3)
            row = dict(device="cpu", kind="pruned_quantized_linear", shape=f"{out_f}x{in_f}", bits=bits,
                       dtype=str(dtype).removeprefix("torch."), sparsity="2:4", tokens=t, dense_ms=d * 1e3,
                       ours_ms=s * 1e3, speedup_vs_dense=d / s, path=q.runtime_path(t), rel_err=err,
                       weight_copies=copies)
            if t == 1:
                with forced_kernels("torch"):
                    slow = timed(lambda: q(x))
                row["torch_path_ms"], row["torch_path_speedup_vs_dense"] = slow * 1e3, d / slow
            rows.append(row)
            print(f"[2:4 int{bits} {row['dtype']} {row['shape']} x{t}] {d * 1e3:.1f} / {s * 1e3:.1f} ms = "
                  f"{d / s:.2f}x", file=sys.stderr)
    return rows


def _random_pruned_copy(q: QuantizedLinear) -> QuantizedLinear:
    other = QuantizedLinear(q.in_features, q.out_features, bits=q.bits, group_size=q.group_size, sparsity="nm", n=2,
                            m=4, dtype=q.weight_scale.dtype)
    other.weight_packed.random_(0, 256)
    other.indices.copy_(q.indices)  # positions: any valid 2:4 pattern reads the same bytes
    other.weight_scale.uniform_(1e-3, 2e-3)
    return other


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def e2e_rows(dtypes, steps: int = 32) -> list[dict]:
    import compress
    from compress.passes import Prune, Quantize

    rows = []
    ids = torch.randint(100, 8000, (1, 256), generator=torch.Generator().manual_seed(0))
    gen = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)

    def tokens_per_s(model) -> float:
        model.generate(ids, **{**gen, "max_new_tokens": 2, "min_new_tokens": 2})
        return steps / min(timed(lambda: model.generate(ids, **gen)) for _ in range(3))

    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        base = tokens_per_s(compress.load("builtin:tiny", dtype=name))
        for bits, pruned in ((4, False), (8, False), (4, True)):
            model = compress.load("builtin:tiny", dtype=name)
            passes = [Prune(method="magnitude", structure="2:4")] if pruned else []
            compress.apply(model, passes + [Quantize(method="rtn", bits=bits, group_size=GROUP)], progress=False)
            ours = tokens_per_s(model.eval())
            rows.append(dict(device="cpu", kind="e2e_decode", shape="builtin:tiny" + (" 2:4" if pruned else ""),
                             bits=bits, dtype=name, tokens=steps, dense_tokens_per_s=base, ours_tokens_per_s=ours,
                             speedup_vs_dense=ours / base))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    ap.add_argument("--quick", action="store_true", help="1 token, fewer repeats (a smoke run)")
    args = ap.parse_args()
    from compress.models import native_dtype

    torch.set_num_threads(1)
    dtypes = [torch.float32] + ([torch.bfloat16] if native_dtype(torch.bfloat16, "cpu") else [])
    rows = layer_rows(dtypes, [1] if args.quick else [1, 4, 16, 64], 3 if args.quick else 7)
    for dtype in dtypes:
        rows += pruned_rows([1] if args.quick else [1, 4, 16, 64], 3 if args.quick else 7, dtype=dtype)
    rows += e2e_rows(dtypes)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, one thread; speedup = dense time / ours")
    for r in rows:
        slow = f"  torch path {r['torch_path_speedup_vs_dense']:.3f}x" if "torch_path_speedup_vs_dense" in r else ""
        print(f"{r['kind']:<17}{r['dtype']:<9}int{r['bits']}  {r['shape']:<12}{r['tokens']:>4}"
              f"{r['speedup_vs_dense']:>8.2f}x{slow}")


if __name__ == "__main__":
    run_cli(main)

"""The weight kernels on a CUDA GPU: each Triton kernel against its torch reference (max relative error) and
against the dense cuBLAS baseline it replaces (time ratio), at Llama-like shapes, in one process.

    python benchmarks/gpu_kernels.py [--json]

Rows: N:M (2:4) and bitmask (50% unstructured) SparseLinear vs dense fp16 `F.linear` at Llama-2-7B MLP/attention
shapes for 1 and 64 tokens; the fused VQ-Logits head (K=2048) vs the dense fp16 head at Llama-3-8B's size
(V=128256, d=4096). Times are medians of `triton.testing.do_bench`. Needs CUDA; exits 2 without it."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from compress.kernels.dispatch import forced_kernels
from compress.bench_args import run_cli  # noqa: E402

DEVICE = "cuda"
DTYPE = torch.float16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def with_kernels(mode: str, fn):
    with forced_kernels(mode):
        return fn()


def bench(fn) -> float:
    if DEVICE != "cuda":
        fn()
        return float("nan")
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def sparse_rows(tokens_list, shapes):
    from compress.prune.masks import nm_mask, unstructured_mask
    from compress.prune.sparse_linear import SparseLinear

    rows = []
    for out_f, in_f in shapes:
        linear = torch.nn.Linear(in_f, out_f, bias=False, device=DEVICE, dtype=DTYPE)
        scores = linear.weight.detach().abs().float()
        for structure, mask, nm in (("2:4", nm_mask(scores, 2, 4), (2, 4)),
                                    ("unstructured-50", unstructured_mask(scores, 0.5), None)):
            masked = (linear.weight.detach() * mask).contiguous()
            sparse = SparseLinear.from_linear(linear, mask, nm).to(DEVICE)
            for tokens in tokens_list:
                x = torch.randn(tokens, in_f, device=DEVICE, dtype=DTYPE)
                ours = with_kernels("triton", lambda: sparse(x))
                # the packed weight decoded by the torch reference, in fp32 (on CUDA the layer always dispatches
                # to its GPU paths, whatever COMPRESS_KERNELS says)
                ref = F.linear(x.float(), sparse.dense_weight(torch.float32))
                dense = F.linear(x, masked)
                t_dense = bench(lambda: F.linear(x, masked))
                t_ours = with_kernels("triton", lambda: bench(lambda: sparse(x)))
                rows.append({"kernel": f"sparse {structure}", "shape": f"{out_f}x{in_f}", "tokens": tokens,
                             "rel_err_vs_reference": rel_err(ours, ref), "rel_err_vs_dense": rel_err(ours, dense),
                             "dense_ms": t_dense, "ours_ms": t_ours, "speedup": t_dense / t_ours})
    return rows


def vq_rows(tokens_list, vocab=128256, dim=4096, codes_k=2048):
    from compress.kernels import vq_logits as vk

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    head = torch.randn(vocab, dim, device=DEVICE, dtype=DTYPE, generator=gen) / dim**0.5
    codebook = torch.randn(codes_k, dim, device=DEVICE, dtype=DTYPE, generator=gen) / dim**0.5
    codes = torch.randint(0, codes_k, (vocab,), device=DEVICE, generator=gen).to(torch.int16)
    scales = torch.rand(vocab, device=DEVICE, generator=gen) + 0.5
    biases = torch.randn(vocab, device=DEVICE, generator=gen) * 0.1
    rows = []
    for tokens in tokens_list:
        h = torch.randn(tokens, dim, device=DEVICE, dtype=DTYPE, generator=gen)
        ours = with_kernels("triton", lambda: vk.vq_logits(h, codebook, codes, scales, biases))
        ref = vk.vq_logits_reference(h.double(), codebook.double(), codes.long(), scales.double(), biases.double())
        t_dense = bench(lambda: F.linear(h, head))
        t_ours = with_kernels("triton", lambda: bench(lambda: vk.vq_logits(h, codebook, codes, scales, biases)))
        t_lse = with_kernels("triton", lambda: bench(lambda: vk.vq_logsumexp(h, codebook, codes, scales, biases)))
        rows.append({"kernel": "vq_logits K=2048", "shape": f"{vocab}x{dim}", "tokens": tokens,
                     "rel_err_vs_reference": rel_err(ours, ref), "rel_err_vs_dense": None,
                     "dense_ms": t_dense, "ours_ms": t_ours, "speedup": t_dense / t_ours,
                     "logsumexp_ms": t_lse, "logsumexp_speedup": t_dense / t_lse})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU under TRITON_INTERPRET=1 (checks the script, times nothing useful)")
    args = ap.parse_args()
    global DEVICE, DTYPE
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":  # Triton reads it at import: run again with it set
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
        DEVICE, DTYPE = "cpu", torch.float32
        rows = sparse_rows([2], [(64, 64)]) + vq_rows([2], vocab=300, dim=64, codes_k=32)
        # nothing is timed on the CPU: null, not NaN (which strict JSON parsers refuse)
        print(json.dumps([{k: None if isinstance(v, float) and v != v else v for k, v in r.items()} for r in rows]))
        return
    if not torch.cuda.is_available():
        print("benchmarks/gpu_kernels.py needs a CUDA GPU", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(0)
    tokens = [1, 64]
    rows = sparse_rows(tokens, [(4096, 4096), (11008, 4096), (4096, 11008)]) + vq_rows(tokens)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'kernel':<22}{'shape':>14}{'tokens':>8}{'err/ref':>10}{'dense ms':>10}{'ours ms':>10}{'speedup':>9}")
    for r in rows:
        print(f"{r['kernel']:<22}{r['shape']:>14}{r['tokens']:>8}{r['rel_err_vs_reference']:>10.1e}"
              f"{r['dense_ms']:>10.4f}{r['ours_ms']:>10.4f}{r['speedup']:>8.2f}x")


if __name__ == "__main__":
    run_cli(main)

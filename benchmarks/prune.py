"""Pruning benchmark: dense vs magnitude / Wanda / SparseGPT at 50% unstructured, 2:4 and 4:8, one run, one table.

Quality (`--model`, default builtin:small, the trained reference model that copies): every configuration is
pruned with the `prune` pass, saved with `compress.save`, reloaded with `compress.load` (so SparseLinear modules
are rebuilt from the checkpoint) and evaluated against the dense model as in compress.evaluate (non-overlapping
256-token held-out windows): perplexity, KL(dense || pruned), top-1 agreement, and the copy probe (greedy
accuracy on the second copy of 8 random 128-token spans: in-context retrieval, which perplexity does not show).
Sizes:
  checkpoint_bytes_ratio   all *.safetensors of the pruned checkpoint / the dense one (both bf16); the
                           embeddings and lm_head (about half of this small model) stay dense by default
  pruned_checkpoint_ratio  the pruned Linears' tensors in the checkpoint / the same Linears' dense bf16 weights
  resident_bytes_ratio     bytes held by the reloaded model's tensors / the dense model's (both loaded fp32)
  pruned_resident_ratio    the same, over the pruned Linears only
  seconds                  wall time of the pass (calibration forward passes included)

Speed (--kernels, on by default in table mode): SparseLinear (torch path: decode the packed weight, then matmul) vs
a dense nn.Linear, at Llama-like shapes (TinyLlama-1.1B's attention and MLP projections), 1 token (decoding) and
64 tokens (a prompt); ratio = SparseLinear time / dense time (> 1: slower), median of repeated runs, one process.

    OMP_NUM_THREADS=1 python benchmarks/prune.py                 # both tables
    OMP_NUM_THREADS=1 python benchmarks/prune.py --json          # JSON list, one object per configuration
    OMP_NUM_THREADS=1 python benchmarks/prune.py --kernels --json  # JSON list of the speed rows only
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.utils import benchmark

import compress
from compress.eval.probes import copy_probe
from compress.evaluate import evaluate, heldout_windows
from compress.pass_api import tensor_bytes
from compress.prune import Prune, SparseLinear
from compress.prune.masks import nm_mask, unstructured_mask
from compress.bench_args import output_file, positive_int, run_cli  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")
STRUCTURES = ("unstructured", "2:4", "4:8")
SHAPES = ((2048, 2048), (5632, 2048), (2048, 5632))  # (out, in): q/o projection, gate/up, down


def checkpoint_tensor_bytes(folder: Path) -> dict[str, int]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                t = sf.get_slice(k)
                shape, dtype = t.get_shape(), t.get_dtype()
                size = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I64": 8, "I32": 4, "BOOL": 1}[dtype]
                n = 1
                for s in shape:
                    n *= s
                out[k] = n * size
    return out


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def module_bytes(tensors: dict[str, int], modules) -> int:
    return sum(b for k, b in tensors.items() if any(k.startswith(m + ".") for m in modules))


def quality_rows(num_samples: int, windows_n: int, progress: bool, model_name: str = "builtin:small") -> list[dict]:
    tok = compress.load_tokenizer(model_name)
    dense = compress.load(model_name, dtype="float32")
    windows = heldout_windows(tok, seq_len=256, max_windows=windows_n)
    calibration = {"source": "builtin:calibration", "num_samples": num_samples, "seq_len": 256}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = compress.save(dense, Path(tmp) / "dense")
        dense_file = safetensors_bytes(dense_dir)
        dense_tensors = checkpoint_tensor_bytes(dense_dir)
        dense_resident = tensor_bytes(dense)
        ev = evaluate(dense, windows, dense, progress=False)
        rows.append(dict(method="dense", structure="dense", sparsity=0.0, perplexity=ev["perplexity"], kl=ev["kl"],
                         copy_accuracy=copy_probe(dense, num=8),
                         top1_agreement=ev["top1_agreement"], checkpoint_bytes_ratio=1.0, pruned_checkpoint_ratio=1.0,
                         resident_bytes_ratio=1.0, pruned_resident_ratio=1.0, seconds=0.0))
        for structure in STRUCTURES:
            for method in METHODS:
                model = copy.deepcopy(dense)  # one snapshot of the weights for every row
                t0 = time.perf_counter()
                model, report = compress.apply(model, [Prune(method=method, structure=structure)],
                                               calibration=calibration, tokenizer=tok, progress=progress)
                seconds = time.perf_counter() - t0
                details = report.passes[0].details
                pruned = report.passes[0].modules
                out = compress.save(model, Path(tmp) / f"{method}-{structure.replace(':', 'of')}")
                del model
                reloaded = compress.load(out, dtype="float32")  # as the dense model: "auto" is bf16 on some CPUs
                packed = sum(isinstance(m, SparseLinear) for m in reloaded.modules())
                tensors = checkpoint_tensor_bytes(out)
                ev = evaluate(reloaded, windows, dense, progress=False)
                rows.append(dict(
                    method=method, structure=structure, sparsity=details["sparsity"],
                    perplexity=ev["perplexity"], kl=ev["kl"], top1_agreement=ev["top1_agreement"],
                    copy_accuracy=copy_probe(reloaded, num=8),
                    checkpoint_bytes_ratio=safetensors_bytes(out) / dense_file,
                    pruned_checkpoint_ratio=module_bytes(tensors, pruned) / module_bytes(dense_tensors, pruned),
                    resident_bytes_ratio=tensor_bytes(reloaded) / dense_resident,
                    pruned_resident_ratio=sum(tensor_bytes(reloaded.get_submodule(n)) for n in pruned)
                    / sum(tensor_bytes(dense.get_submodule(n)) for n in pruned),
                    seconds=seconds, packed_modules=packed, hessian_notes=len(details.get("hessian", {})),
                ))
                print(f"  {method:9s} {structure:12s} ppl {ev['perplexity']:.2f} ({seconds:.1f}s)", file=sys.stderr)
    return [{"model": model_name, **r} for r in rows]


def median_seconds(fn) -> float:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median


@torch.no_grad()
def kernel_rows(tokens_list=(1, 64)) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in SHAPES:
        dense = nn.Linear(in_f, out_f, bias=False)
        nn.init.normal_(dense.weight, generator=gen)
        scores = dense.weight.abs()
        for structure, nm in (("2:4", (2, 4)), ("unstructured", None)):
            mask = nm_mask(scores, *nm) if nm else unstructured_mask(scores, 0.5)
            masked = nn.Linear(in_f, out_f, bias=False)
            masked.weight.copy_(dense.weight * mask)
            sparse = SparseLinear.from_linear(masked, mask, nm)
            for tokens in tokens_list:
                x = torch.randn(tokens, in_f, generator=gen)
                err = float((sparse(x) - masked(x)).abs().max() / masked(x).abs().max())
                t_dense = median_seconds(lambda: masked(x))
                t_sparse = median_seconds(lambda: sparse(x))
                rows.append(dict(shape=f"{out_f}x{in_f}", structure=structure, tokens=tokens,
                                 dense_ms=t_dense * 1e3, sparse_ms=t_sparse * 1e3, time_ratio=t_sparse / t_dense,
                                 bytes_ratio=tensor_bytes(sparse) / tensor_bytes(masked), max_rel_err=err))
    return rows


def print_tables(quality: list[dict] | None, kernels: list[dict] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=None if sys.stdout.isatty() else 160)  # no truncated columns when piped to a file
    con.print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
    if quality:
        t = Table(title=f"pruning {quality[0]['model']} (held-out text; ratios vs dense)")
        for col in ("method", "structure", "sparsity", "ppl", "KL", "top-1", "copy", "ckpt", "ckpt (pruned)",
                    "resident", "resident (pruned)", "seconds"):
            t.add_column(col, justify="right")
        for r in quality:
            t.add_row(r["method"], r["structure"], f"{r['sparsity']:.3f}", f"{r['perplexity']:.2f}",
                      f"{r['kl']:.4f}", f"{r['top1_agreement']:.3f}", f"{r['copy_accuracy']:.3f}",
                      f"{r['checkpoint_bytes_ratio']:.3f}",
                      f"{r['pruned_checkpoint_ratio']:.3f}", f"{r['resident_bytes_ratio']:.3f}",
                      f"{r['pruned_resident_ratio']:.3f}", f"{r['seconds']:.1f}")
        con.print(t)
    if kernels:
        t = Table(title="SparseLinear (torch path) vs dense nn.Linear, fp32, CPU, 50% sparse")
        for col in ("shape (out x in)", "structure", "tokens", "dense ms", "sparse ms", "time ratio", "bytes ratio",
                    "max rel err"):
            t.add_column(col, justify="right")
        for r in kernels:
            t.add_row(r["shape"], r["structure"], str(r["tokens"]), f"{r['dense_ms']:.3f}", f"{r['sparse_ms']:.3f}",
                      f"{r['time_ratio']:.2f}", f"{r['bytes_ratio']:.3f}", f"{r['max_rel_err']:.1e}")
        con.print(t)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print a JSON list on stdout (quality rows, or with "
                                                        "--kernels the speed rows)")
    ap.add_argument("--kernels", action="store_true", help="only the SparseLinear vs Linear speed table")
    ap.add_argument("--save-json", metavar="PATH", type=output_file, help="also write {quality, kernels} rows to PATH (table mode)")
    ap.add_argument("--num-samples", type=positive_int, default=64, help="calibration windows of 256 tokens")
    ap.add_argument("--windows", type=positive_int, default=32, help="held-out windows of 256 tokens")
    ap.add_argument("--model", default="builtin:small", help="reference model (builtin:tiny for quick runs)")
    args = ap.parse_args(argv)
    if args.kernels:
        rows = kernel_rows()
        print(json.dumps(rows, indent=1)) if args.json else print_tables(None, rows)
        return
    quality = quality_rows(args.num_samples, args.windows, progress=False, model_name=args.model)
    if args.json:
        print(json.dumps(quality, indent=1))
        return
    kernels = kernel_rows()
    print_tables(quality, kernels)
    if args.save_json:
        Path(args.save_json).write_text(json.dumps({"quality": quality, "kernels": kernels}, indent=1))


if __name__ == "__main__":
    run_cli(main)

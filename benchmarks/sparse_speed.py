"""Sparse layers against dense ones, in one process, one table per device (ratio > 1 = ours faster).

    python benchmarks/sparse_speed.py [--json] [--quick]
    python benchmarks/sparse_speed.py --gather-crossover [--json]   # where the CPU gathers start to pay

CPU (one torch thread, fp32; speeds as ratios of paired medians):
- runtime_dense: a 2:4 SparseLinear loaded with runtime `dense` vs the unpruned nn.Linear, Llama shapes, 1/8/64
  tokens; packed_gemv / runtime_packed: the packed runtime (packed_gemv where it is the C product over the packed
  values, at <= 8 tokens, 16 for bf16; runtime_packed above, blocks of rows decoded for torch's GEMM), 2:4 and 50%
  unstructured, 1-512 tokens; e2e_prefill / e2e_decode: builtin:tiny
  and builtin:small pruned 2:4 (magnitude) loaded with each runtime vs unpruned, prefill 256 tokens and greedy
  decoding of 64, and a 2-layer model with Llama-3-8B's layer shapes (random weights), prefill 128 and 16 decoded.
  On a CPU that computes bf16 natively (what `dtype: auto` loads there) the runtime_packed rows and the 2-layer
  model's rows again in bf16, against the dense bf16 layer / model (`dtype` in the rows).
  unmerged_adapter: a 2:4 layer carrying an unmerged LoRA adapter (recover's `merge: false`) vs the dense layer
  (`vs_packed`: vs the packed layer alone), 1/16/128 tokens, the merged copy that calls without gradients run, and
  at 1 token the training call (the masked update built per call).
  `--only-runtimes`: these rows only (no activation-sparsity calibration).
- activation_sparse_mlp: the `activation_sparsity` pass (neuron scaling unless `--no-neuron-scaling`) is calibrated
  on the reference model (`--model`, default builtin:small, fp32; `--ppl-budget` on its calibration windows);
  ppl_delta_pct is the held-out perplexity change at those thresholds (ppl_delta_pct_ci95: its 95% interval over
  the held-out windows) and `sparsity` the inactive share measured there. By default the recipe's settings
  (recipes/activation-sparse.yaml: the int8 copy as the gate, one CETT value, a 0.7% budget, 48 calibration
  windows, all 199 held-out ones): rows `gate` "int8 gate, every neuron" (the quantized gate alone) and "int8 gate".
  With `--no-quantized-gate` the exact gate: "dense gate" (the whole gate computed) and "predictor rank r" (a rank-r
  SVD predictor, rank = `--predictor-ratio` x hidden, picks candidates; only their gate rows are read; its misses
  are in its row's ppl_delta_pct), or with `--predictor-bits 8|4` "predictor int8|int4" (the gate's quantized copy
  picks them). Speed: an ActivationSparseMLP at Llama-3-8B's MLP shape (4096 x 14336, random weights) whose
  thresholds give the same inactive (and candidate) shares on its inputs, vs the same dense MLP, 1 and 4 tokens, and
  a prefill of `--prefill-tokens` (the masked dense path). Timed over enough copies (`weight_copies`, distinct random
  weights, called in turn) that the weights read per cycle exceed 3x the CPU's largest cache, as the 32 layers of a real model do: a 480 MB L3 would otherwise
  hold the sparse path's ~460 MB working set and not the dense path's 705 MB, a gain no real model sees.
CUDA (fp16, when a GPU is present): per shape and tokens, dense cuBLAS vs the packed runtime's dispatched path
(kind semi_structured for 2:4, dispatch for the 50%-unstructured bitmask above 16 tokens, with every candidate's
time), the packed GEMV alone (packed_gemv, <= 16 tokens), the
activation-sparse MLP (Triton gathers), and a 2-layer model with Llama-3-8B layer shapes, all Linears 2:4: prefill
of 4096 tokens and 64 decoded tokens, tokens/s vs dense. Without CUDA only the CPU rows print (exit 0).
`--json`: the rows of the kinds other tools read (CONTRACT_KINDS), each with device, kind, shape, tokens and
speedup_vs_dense (a CUDA row that failed: those null, and `error`); `--all-kinds` adds the others (runtime_packed,
unmerged_adapter, dispatch)."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from activation_sparse_rows import (calibrated_quality, cpu_activation_sparse, cpu_gather_crossover,  # noqa: E402
                                    cuda_activation_sparse, cuda_ms)
from vq_logits import paired_median_seconds  # noqa: E402
from compress.bench_args import (fill_unset, fraction, nonnegative_int, output_file, positive_float,  # noqa: E402
                                 positive_int, run_cli)


# the row kinds of `--json` that other tools read (issue 9's interface); the rest print with --all-kinds
CONTRACT_KINDS = ("semi_structured", "packed_gemv", "runtime_dense", "activation_sparse_mlp", "e2e_prefill",
                  "e2e_decode")


def perplexity_budget(text: str) -> float:
    """A relative perplexity increase, as the pass takes it: 0.007 is 0.7%."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{value} is a fraction (0.007 = +0.7% perplexity): must be below 1")
    return value


SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # (out, in)


def pruned_pair(out_f: int, in_f: int, dtype=torch.float32, device="cpu", structure="2:4"):
    from compress.prune.masks import nm_mask, unstructured_mask
    from compress.prune.sparse_linear import SparseLinear

    lin = nn.Linear(in_f, out_f, bias=False, dtype=dtype, device=device)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    mask = nm_mask(lin.weight.abs(), 2, 4) if structure == "2:4" else unstructured_mask(lin.weight.abs(), 0.5)
    sparse = SparseLinear.from_linear(lin, mask, (2, 4) if structure == "2:4" else None)
    return lin, sparse


# ------------------------------------------------------------------------------------------------ CPU
@torch.no_grad()
def cpu_runtime_dense(tokens_list, repeats) -> list[dict]:
    rows = []
    for out_f, in_f in SHAPES:
        lin, sparse = pruned_pair(out_f, in_f)
        sparse.set_runtime("dense")
        for t in tokens_list:
            x = torch.randn(t, in_f)
            dense_s, ours_s = paired_median_seconds([lambda: lin(x), lambda: sparse(x)], repeats)
            rows.append(dict(device="cpu", kind="runtime_dense", shape=f"{out_f}x{in_f}", tokens=t,
                             speedup_vs_dense=dense_s / ours_s, dense_ms=dense_s * 1e3, ours_ms=ours_s * 1e3))
        del lin, sparse
    return rows


@torch.no_grad()
def cpu_runtime_packed(tokens_list, repeats, shapes=SHAPES, dtype=torch.float32) -> list[dict]:
    """The packed runtime (kernels/sparse_linear_cpu.py: the C product at few tokens, blocks of rows decoded for
    torch's GEMM above) vs the unpruned nn.Linear of the same dtype, 2:4 and 50% unstructured (bitmask)."""
    from compress.pass_api import tensor_bytes

    rows = []
    for out_f, in_f in shapes:
        for structure in ("2:4", "unstructured"):
            lin, sparse = pruned_pair(out_f, in_f, dtype, structure=structure)
            sparse.set_runtime("packed")
            for t in tokens_list:
                x = torch.randn(t, in_f).to(dtype)
                dense_s, ours_s = paired_median_seconds([lambda: lin(x), lambda: sparse(x)], repeats)
                path = sparse.runtime_path(t)  # the C product over the packed values is the CPU's packed GEMV
                rows.append(dict(device="cpu", kind="packed_gemv" if "C product" in path else "runtime_packed",
                                 shape=f"{out_f}x{in_f}", tokens=t,
                                 dtype=str(dtype).removeprefix("torch."), structure=structure,
                                 path=path, speedup_vs_dense=dense_s / ours_s,
                                 dense_ms=dense_s * 1e3, ours_ms=ours_s * 1e3,
                                 bytes_vs_dense=tensor_bytes(sparse) / tensor_bytes(lin)))
    return rows


def _e2e_rows(base, pruned_checkpoint, label: str, prefill_tokens: int, decode_tokens: int, repeats: int,
              vocab: int) -> list[dict]:
    """Prefill and greedy decoding of `base` vs the pruned checkpoint loaded with each runtime, one process."""
    import compress

    ids = torch.randint(0, vocab, (1, prefill_tokens), generator=torch.Generator().manual_seed(0))
    gen = dict(max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False, pad_token_id=0)
    rows = []
    dtype = next(base.parameters()).dtype  # `auto` would load bf16 on an AVX512-BF16 CPU against a float32 base
    for runtime in ("dense", "packed"):
        ours = compress.load(pruned_checkpoint, sparse_runtime=runtime, dtype=dtype)
        prefill = paired_median_seconds([lambda: base(input_ids=ids), lambda: ours(input_ids=ids)], repeats,
                                        min_batch_seconds=0)
        decode = paired_median_seconds([lambda: base.generate(ids[:, :16], **gen),
                                        lambda: ours.generate(ids[:, :16], **gen)],
                                       max(3, repeats // 2), min_batch_seconds=0)
        shape = f"{label} 2:4 runtime={runtime}"
        rows += [dict(device="cpu", kind="e2e_prefill", shape=shape, tokens=prefill_tokens,
                      speedup_vs_dense=prefill[0] / prefill[1]),
                 dict(device="cpu", kind="e2e_decode", shape=shape, tokens=decode_tokens,
                      speedup_vs_dense=decode[0] / decode[1], dense_tokens_per_s=decode_tokens / decode[0])]
    return rows


@torch.no_grad()
def cpu_e2e(repeats, model: str = "builtin:tiny") -> list[dict]:
    """A reference model pruned 2:4 (magnitude) vs itself unpruned: prefill 256 tokens, 64 decoded tokens."""
    import tempfile

    import compress
    from compress.prune import Prune

    base = compress.load(model)
    pruned, _ = compress.apply(compress.load(model), [Prune(method="magnitude", structure="2:4")], progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = compress.save(pruned, Path(tmp) / "p")
        return _e2e_rows(base, checkpoint, model, 256, 64, repeats, base.config.vocab_size)


@torch.no_grad()
def cpu_e2e_llama3_shape(repeats, layers: int = 2, prefill_tokens: int = 128, decode_tokens: int = 16,
                         dtype=torch.float32) -> list[dict]:
    """A `layers`-layer model with Llama-3-8B's layer shapes (random weights; vocabulary 8192, so that the head does
    not dominate), every decoder Linear pruned 2:4, vs the unpruned model, both in `dtype`."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    import compress
    from compress.prune import Prune

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=8192, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        pruned, _ = compress.apply(copy.deepcopy(base), [Prune(method="magnitude", structure="2:4")],
                                   progress=False)
        checkpoint = compress.save(pruned, Path(tmp) / "p")
        del pruned
        label = f"{layers} Llama-3-8B layers" + ("" if dtype == torch.float32 else f" {dtype}".replace("torch.", ""))
        return _e2e_rows(base, checkpoint, label, prefill_tokens, decode_tokens, repeats, 8192)


# ------------------------------------------------------------------------------------------------ CUDA
@torch.no_grad()
def cuda_layers(tokens_list, shapes=SHAPES) -> list[dict]:
    from compress.prune import gpu_dispatch

    rows = []
    for out_f, in_f in shapes:
        for structure in ("2:4", "unstructured"):
            lin, sparse = pruned_pair(out_f, in_f, torch.float16, "cuda", structure)
            for t in tokens_list:
                x = torch.randn(t, in_f, device="cuda", dtype=torch.float16)
                dense = cuda_ms(lambda: lin(x))
                ref = lin(x).float()
                times = {p: cuda_ms(lambda p=p: gpu_dispatch.RUN[p](sparse, x, None))
                         for p in gpu_dispatch.candidates(sparse, t, torch.float16)}
                chosen = gpu_dispatch.choose(sparse, t, torch.float16, x)
                err = float((sparse(x).float() - ref).norm() / ref.norm())
                common = dict(device="cuda", shape=f"{out_f}x{in_f}", tokens=t, structure=structure,
                              dense_ms=dense, rel_err=err)
                if "packed_gemv" in times:
                    rows.append(dict(common, kind="packed_gemv", speedup_vs_dense=dense / times["packed_gemv"],
                                     ours_ms=times["packed_gemv"]))
                if structure == "2:4" or t > 16:  # the dispatched path (bitmask above 16 tokens: expand + cuBLAS)
                    rows.append(dict(common, kind="semi_structured" if structure == "2:4" else "dispatch",
                                     path=chosen, ours_ms=times[chosen], speedup_vs_dense=dense / times[chosen],
                                     paths={p: dense / v for p, v in times.items()}))
                # one line per shape as it completes: a run cut by a timeout still leaves its rows
                print(f"[cuda] {structure} {out_f}x{in_f} x{t}: " + ", ".join(
                    f"{p} {dense / v:.2f}x" for p, v in times.items()) + f" (chosen {chosen})", file=sys.stderr)
            del lin, sparse
            torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def cuda_e2e(prefill_tokens: int = 4096, decode_tokens: int = 64) -> list[dict]:
    """2 decoder layers with Llama-3-8B shapes (small vocabulary: the layers are what is measured), all Linears 2:4."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import compress
    from compress.prune import Prune

    config = AutoConfig.for_model("llama", vocab_size=1024, hidden_size=4096, intermediate_size=14336,
                                  num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
                                  max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float16).cuda().eval()
    sparse = AutoModelForCausalLM.from_config(config, dtype=torch.float16).cuda().eval()
    sparse.load_state_dict(dense.state_dict())
    compress.apply(sparse, [Prune(method="magnitude", structure="2:4", ignore=["re:.*lm_head"])], progress=False)
    ids = torch.randint(0, 1024, (1, prefill_tokens), device="cuda")
    pre_d = cuda_ms(lambda: dense(input_ids=ids), 200)
    pre_s = cuda_ms(lambda: sparse(input_ids=ids), 200)
    gen = dict(max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False, pad_token_id=0)

    def decode_s(model):
        model.generate(ids[:, :128], **gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids[:, :128], **gen)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    dec_d, dec_s = decode_s(dense), decode_s(sparse)
    shape = "2 layers Llama-3-8B, all Linears 2:4"
    print(f"[cuda e2e] prefill {pre_d / pre_s:.2f}x, decode {dec_d / dec_s:.2f}x", file=sys.stderr)
    return [dict(device="cuda", kind="e2e_prefill", shape=shape, tokens=prefill_tokens, speedup_vs_dense=pre_d / pre_s),
            dict(device="cuda", kind="e2e_decode", shape=shape, tokens=decode_tokens, speedup_vs_dense=dec_d / dec_s)]


def cpu_unmerged_adapter(tokens_list, repeats, shapes=((4096, 4096), (14336, 4096))) -> list[dict]:
    """A 2:4 packed layer carrying an unmerged LoRA adapter (recover's `merge: false`, r=8) vs the dense layer and
    the packed layer alone: calls that train nothing run a merged copy (compress/recover/lora.py), training calls
    build the masked update M * B A each time (timed at 1 token; `path` says which)."""
    from peft import LoraConfig

    from compress.pass_api import tensor_bytes
    from compress.recover.lora import ADAPTER, SparsityKeepingLoraLinear

    rows = []
    for out_f, in_f in shapes:
        lin, sparse = pruned_pair(out_f, in_f)
        adapted = SparsityKeepingLoraLinear(copy.deepcopy(sparse), ADAPTER, config=LoraConfig(r=8, lora_alpha=16),
                                            r=8, lora_alpha=16)
        with torch.no_grad():
            adapted.lora_B[ADAPTER].weight.normal_(0, 0.01)
        for t in tokens_list:
            x = torch.randn(t, in_f)
            with torch.no_grad():
                dense_s, packed_s, ours_s = paired_median_seconds([lambda: lin(x), lambda: sparse(x),
                                                                   lambda: adapted(x)], repeats)
            copy_bytes = tensor_bytes(adapted.__dict__["_merged_cache"][1])
            rows.append(dict(device="cpu", kind="unmerged_adapter", shape=f"{out_f}x{in_f}", tokens=t,
                             path="merged copy (no grad)", speedup_vs_dense=dense_s / ours_s,
                             vs_packed=packed_s / ours_s, dense_ms=dense_s * 1e3, ours_ms=ours_s * 1e3,
                             extra_bytes_vs_packed=copy_bytes / tensor_bytes(sparse)))
            if t == 1:  # the training call, with its graph (slow: a few repeats), against the times above
                train_s = paired_median_seconds([lambda: adapted(x)], 3)[0]
                rows.append(dict(device="cpu", kind="unmerged_adapter", shape=f"{out_f}x{in_f}", tokens=t,
                                 path="per-call update (training)", speedup_vs_dense=dense_s / train_s,
                                 vs_packed=packed_s / train_s, dense_ms=dense_s * 1e3, ours_ms=train_s * 1e3))
        del lin, sparse, adapted
    return rows


def print_table(rows: list[dict]) -> None:
    for device in ("cpu", "cuda"):
        sub = [r for r in rows if r["device"] == device]
        if not sub:
            continue
        print(f"\n{device}: speedup = dense time / ours (> 1: ours faster)")
        print(f"{'kind':<22}{'shape':<36}{'tokens':>7}{'speedup':>9}  extra")
        for r in sub:
            if "error" in r:
                print(f"{r['kind']:<22}error: {r['error']}")
                continue
            extra = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                     if k in ("dtype", "path", "gate", "sparsity", "candidate_share", "ppl_delta_pct", "rel_err",
                              "weight_copies", "structure", "paths", "bytes_vs_dense", "vs_packed",
                              "extra_bytes_vs_packed")}
            print(f"{r['kind']:<22}{r['shape']:<36}{r['tokens']:>7}{r['speedup_vs_dense']:>8.2f}x  {extra or ''}")


def linear_shape(text: str) -> tuple[int, int]:
    try:
        out_f, in_f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected OUTxIN, e.g. 14336x4096") from None
    return out_f, in_f


QUALITY_KEYS = ("model", "sparsity", "ppl_delta_pct", "kl", "calibration_ppl_delta_pct")


def read_quality(path: Path) -> tuple[dict | None, str | None]:
    """(a --save-quality file's contents, None), or (None, why the rows cannot use it): the keys they read."""
    try:
        quality = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror})"
    except UnicodeDecodeError:
        return None, "not a JSON file (not UTF-8 text)"
    except json.JSONDecodeError as exc:
        return None, f"not a JSON file ({exc.msg}, line {exc.lineno})"
    if not isinstance(quality, dict):
        return None, "not a JSON object"
    need = list(QUALITY_KEYS)
    if not quality.get("exact_gate", True):
        need.append("quantized_gate_alone")
    elif quality.get("predictor_rank") or quality.get("predictor_bits"):
        need += ["candidate_share"] + (["predictor_ratio"] if quality.get("predictor_rank") else [])
    missing = [k for k in need if k not in quality]
    alone = quality.get("quantized_gate_alone")
    if not missing and "quantized_gate_alone" in need and not (isinstance(alone, dict)
                                                                and {"ppl_delta_pct", "kl"} <= alone.keys()):
        missing = ["quantized_gate_alone.ppl_delta_pct / .kl"]
    if missing:
        return None, f"no {', '.join(missing)} (the keys the rows read)"
    sparsity = quality["sparsity"]
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        return None, f"sparsity {sparsity!r} is not a share in [0, 1)"
    return quality, None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    ap.add_argument("--quick", action="store_true", help="fewer shapes/tokens/repeats (a smoke run)")
    ap.add_argument("--no-cpu", action="store_true", help="CUDA rows only")
    ap.add_argument("--tokens", type=positive_int, nargs="+", help="CUDA layer rows at these token counts only")
    ap.add_argument("--shapes", nargs="+", metavar="OUTxIN", type=linear_shape,
                    help="CUDA layer rows at these Linear shapes only (e.g. 4096x4096 14336x4096)")
    ap.add_argument("--model", default="builtin:small", help="reference model the activation sparsity is calibrated "
                    "and its perplexity measured on (loaded in fp32)")
    ap.add_argument("--greedy-rounds", type=nonnegative_int, default=None, help="activation sparsity: rounds of "
                    "per-layer greedy threshold moves (0, the default: one CETT value for all layers; the greedy "
                    "moves overfit the calibration text, BENCHMARKS.md)")
    ap.add_argument("--ppl-budget", type=perplexity_budget, default=0.007, help="activation sparsity: perplexity "
                    "budget on the calibration windows, a fraction (the held-out change is what the rows report)")
    ap.add_argument("--calibration-samples", type=positive_int, default=None, help="activation sparsity: calibration "
                    "windows of 256 tokens (default 48, 8 with --quick; more: slower search, less overfitting of the "
                    "per-layer thresholds)")
    ap.add_argument("--predictor-ratio", type=float, default=0.0, help="activation sparsity: a low-rank gate "
                    "predictor's rank as a share of the hidden size, with --predictor-bits 0 (0: none)")
    ap.add_argument("--predictor-bits", type=int, choices=(0, 4, 8), default=None, help="activation sparsity: the "
                    "gate's quantized copy (int8 / int4), as the gate (--quantized-gate) or as a predictor of it; 0: "
                    "none (then --predictor-ratio may add a low-rank one); default 8 with --quantized-gate, else 0")
    ap.add_argument("--quantized-gate", action=argparse.BooleanOptionalAction, default=True, help="activation "
                    "sparsity: the --predictor-bits copy is the gate itself (the pass's exact_gate: false, the "
                    "default): no fp32 gate rows read when decoding; --no-quantized-gate: the exact gate")
    ap.add_argument("--recall", type=fraction, default=0.99, help="activation sparsity: the predictor's recall of the "
                    "exactly-active neurons on the calibration tokens")
    ap.add_argument("--neuron-scaling", action=argparse.BooleanOptionalAction, default=True,
                    help="activation sparsity: threshold |act(gate)| x E|up_i| x ||W_down[:, i]|| (the pass's "
                    "neuron_scaling, its default); --no-neuron-scaling: |act(gate)| (CATS)")
    ap.add_argument("--only-activation-sparse", action="store_true", help="only the activation_sparse_mlp rows")
    ap.add_argument("--only-unmerged-adapter", action="store_true", help="only the unmerged_adapter rows (CPU)")
    ap.add_argument("--only-runtimes", action="store_true", help="only the pruned layers' rows (runtime_dense, "
                    "runtime_packed, e2e; CUDA: the dispatched paths): no activation-sparsity calibration")
    ap.add_argument("--gather-crossover", action="store_true", help="only the gather_crossover rows: the CPU row "
                    "gathers vs the dense MLP from builtin:tiny's MLP shape to Llama-3-8B's (50%% inactive, 1 token)")
    ap.add_argument("--all-kinds", action="store_true", help="--json: also the rows of kinds outside the interface "
                    "(runtime_packed above the C product's tokens, unmerged_adapter, the CUDA dispatch of bitmask "
                    "layers); the table always shows them")
    ap.add_argument("--weight-copies", type=nonnegative_int, default=0, help="activation-sparse MLP timing: copies "
                    "of its weights called in turn (0: enough to exceed 3x the largest CPU cache; 1 shows a warm "
                    "cache)")
    ap.add_argument("--prefill-tokens", type=nonnegative_int, default=256, help="activation-sparse MLP: also time a "
                    "prefill of this many tokens (the masked dense path; 0: none)")
    ap.add_argument("--eval-windows", type=positive_int, default=None, help="activation sparsity: held-out windows "
                    "of 256 tokens for the perplexity change and its 95%% interval (default 199, 8 with --quick)")
    ap.add_argument("--save-quality", type=lambda t: Path(output_file(t)),
                    help="write the activation-sparsity calibration result (JSON) here")
    ap.add_argument("--quality", type=Path, help="reuse a --save-quality file instead of calibrating again (the "
                    "slow part: the speed rows then time this machine at that file's inactive shares)")
    args = ap.parse_args(argv)
    fill_unset(args, {"calibration_samples": (48, 8), "eval_windows": (199, 8), "greedy_rounds": (0, 0)}, args.quick)
    if args.predictor_bits is None:
        args.predictor_bits = 8 if args.quantized_gate else 0
    if args.quantized_gate and not args.predictor_bits:
        ap.error("--quantized-gate (the default) computes the gate from its quantized copy: use --predictor-bits 8 "
                 "(or 4), or --no-quantized-gate")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    repeats = 3 if args.quick else 7
    rows: list[dict] = []
    if args.gather_crossover:
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            rows = cpu_gather_crossover(repeats, args.weight_copies)
        finally:
            torch.set_num_threads(saved)
        print(json.dumps(rows)) if args.json else print_table(rows)
        return
    if args.only_unmerged_adapter:
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            rows = cpu_unmerged_adapter([1] if args.quick else [1, 16, 128], repeats)
        finally:
            torch.set_num_threads(saved)
        print(json.dumps(rows)) if args.json else print_table(rows)
        return
    if args.only_runtimes and (args.only_activation_sparse or args.quality or args.save_quality):
        ap.error("--only-runtimes skips activation sparsity: it takes no --only-activation-sparse, --quality or "
                 "--save-quality")
    if args.only_runtimes:
        quality = None
    elif args.quality is not None:
        if not args.quality.is_file():
            ap.error(f"--quality {args.quality}: no such file (write one with --save-quality)")
        quality, problem = read_quality(args.quality)
        if problem:  # found now, not as a traceback after minutes of timing
            ap.error(f"--quality {args.quality}: {problem} (write one with --save-quality)")
    else:
        quality = calibrated_quality(args.model, args.calibration_samples, args.eval_windows, args.greedy_rounds,
                                     args.ppl_budget, args.predictor_ratio, args.recall, args.neuron_scaling,
                                     args.predictor_bits, not args.quantized_gate)
    if args.save_quality is not None:
        args.save_quality.write_text(json.dumps(quality, indent=2))
    if not args.no_cpu:
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            from compress.models import native_dtype

            if quality is not None:
                rows += cpu_activation_sparse(quality, repeats, args.weight_copies,
                                              prefill_tokens=args.prefill_tokens)
            if quality is not None and native_dtype(torch.bfloat16, "cpu"):  # `dtype: auto`'s bf16 on this CPU
                rows += cpu_activation_sparse(quality, repeats, args.weight_copies, torch.bfloat16,
                                              args.prefill_tokens)
            if not args.only_activation_sparse:
                rows += cpu_runtime_dense([1, 8] if args.quick else [1, 8, 64], repeats)
                rows += cpu_runtime_packed([1, 8] if args.quick else [1, 4, 8, 16, 64, 512], repeats)
                if native_dtype(torch.bfloat16, "cpu"):  # bf16 layers against the dense bf16 ones `auto` runs here
                    rows += cpu_runtime_packed([1, 8] if args.quick else [1, 4, 8, 16, 64, 512], repeats,
                                               dtype=torch.bfloat16)
                rows += cpu_unmerged_adapter([1] if args.quick else [1, 16, 128], repeats,
                                             ((4096, 4096),) if args.quick else ((4096, 4096), (14336, 4096)))
                rows += cpu_e2e(repeats)
                if not args.quick:
                    rows += cpu_e2e(repeats, "builtin:small") + cpu_e2e_llama3_shape(repeats)
                    if native_dtype(torch.bfloat16, "cpu"):
                        rows += cpu_e2e_llama3_shape(repeats, dtype=torch.bfloat16)
        finally:
            torch.set_num_threads(saved)
    if torch.cuda.is_available() and not args.only_activation_sparse:
        tokens = args.tokens or ([1, 8, 16] if args.quick else [1, 8, 16, 64, 512, 4096])
        shapes = args.shapes or SHAPES
        rows += cuda_layers(tokens, shapes)
        try:  # one failing row must not cost the GPU run its other rows (device time is scarce)
            rows += cuda_activation_sparse(quality) if quality is not None else []
        except Exception as exc:  # noqa: BLE001 - reported as a row, not hidden
            rows.append(dict(device="cuda", kind="activation_sparse_mlp", shape=None, tokens=None,
                             speedup_vs_dense=None, error=f"{type(exc).__name__}: {exc}"))
        rows += cuda_e2e()
    if args.json:
        print(json.dumps(rows if args.all_kinds else [r for r in rows if r["kind"] in CONTRACT_KINDS]))
    else:
        calibrated = f"; activation sparsity calibrated on {args.model}: {json.dumps(quality)}" if quality else ""
        print(f"torch {torch.__version__}; CPU rows at 1 thread{calibrated}")
        print_table(rows)


if __name__ == "__main__":
    run_cli(main)

"""Sparse layers against dense ones, in one process, one table per device (ratio > 1 = ours faster).

    python benchmarks/sparse_speed.py [--json] [--quick]
    python benchmarks/sparse_speed.py --gather-crossover [--json]   # where the CPU gathers start to pay

CPU (one torch thread, fp32; speeds as ratios of paired medians):
- runtime_dense: a 2:4 SparseLinear loaded with runtime `dense` vs the unpruned nn.Linear, Llama shapes, 1/8/64
  tokens; e2e_prefill / e2e_decode: builtin:tiny pruned 2:4 (runtime dense) vs unpruned, prefill 256 tokens and
  greedy decoding of 64 tokens.
- activation_sparse_mlp: the `activation_sparsity` pass (neuron scaling unless `--no-neuron-scaling`) is calibrated
  on the reference model (`--model`, default builtin:small, fp32; `--ppl-budget` on its calibration windows);
  ppl_delta_pct is the held-out perplexity change at those thresholds (ppl_delta_pct_ci95: its 95% interval over
  the held-out windows) and `sparsity` the inactive share measured there. By default the recipe's settings
  (recipes/activation-sparse.yaml: the int8 copy as the gate, one CETT value, a 0.7% budget, 48 calibration
  windows, all 199 held-out ones): rows `gate` "int8 gate, every neuron" (the quantized gate alone) and "int8 gate".
  With `--no-quantized-gate` the exact gate: "dense gate" (the whole gate computed) and "predictor rank r" (a rank-r
  SVD predictor, rank = `--predictor-ratio` x hidden, picks candidates; only their gate rows are read; its misses
  are in its row's ppl_delta_pct), or with `--predictor-bits 8|4` "predictor int8|int4" (the gate's quantized copy
  picks them). Speed: an ActivationSparseMLP at Llama-3-8B's MLP shape (4096 x 14336, random
  weights) whose thresholds give the same inactive (and candidate) shares on its inputs, vs the same dense MLP, 1
  and 4 tokens, and a prefill of `--prefill-tokens` (the masked dense path). Timed over enough copies (`weight_copies`, distinct random weights, called in turn) that the weights
  read per cycle exceed 3x the CPU's largest cache, as the 32 layers of a real model do: a 480 MB L3 would otherwise
  hold the sparse path's ~460 MB working set and not the dense path's 705 MB, a gain no real model sees.
CUDA (fp16, when a GPU is present): per shape and tokens, dense cuBLAS vs the packed runtime's dispatched path
(kind semi_structured for 2:4, dispatch for the 50%-unstructured bitmask above 16 tokens, with every candidate's
time), the packed GEMV alone (packed_gemv, <= 16 tokens), the
activation-sparse MLP (Triton gathers), and a 2-layer model with Llama-3-8B layer shapes, all Linears 2:4: prefill
of 4096 tokens and 64 decoded tokens, tokens/s vs dense. Without CUDA only the CPU rows print (exit 0)."""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from vq_logits import paired_median_seconds  # noqa: E402
from compress.bench_args import run_cli, positive_int, fraction  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # (out, in)
MLP_SHAPE = (4096, 14336)  # hidden, intermediate (Llama-3-8B)
# builtin:tiny's MLP, builtin:small's, then wider ones up to Llama-3-8B's (--gather-crossover)
GATHER_CROSSOVER_SHAPES = ((256, 704), (384, 1152), (512, 1536), (1024, 2816), (2048, 5632), (4096, 14336))


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
def cpu_e2e_tiny(repeats) -> list[dict]:
    import tempfile

    import compress
    from compress.prune import Prune

    base = compress.load("builtin:tiny")
    pruned, _ = compress.apply(compress.load("builtin:tiny"), [Prune(method="magnitude", structure="2:4")],
                               progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        ours = compress.load(compress.save(pruned, Path(tmp) / "p"))  # the default CPU runtime: dense
    ids = torch.randint(0, 8192, (1, 256), generator=torch.Generator().manual_seed(0))
    prefill = paired_median_seconds([lambda: base(input_ids=ids), lambda: ours(input_ids=ids)], repeats)
    gen = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    decode = paired_median_seconds([lambda: base.generate(ids[:, :16], **gen), lambda: ours.generate(ids[:, :16], **gen)],
                                   max(3, repeats // 2), min_batch_seconds=0)
    return [dict(device="cpu", kind="e2e_prefill", shape="builtin:tiny 2:4 runtime=dense", tokens=256,
                 speedup_vs_dense=prefill[0] / prefill[1]),
            dict(device="cpu", kind="e2e_decode", shape="builtin:tiny 2:4 runtime=dense", tokens=64,
                 speedup_vs_dense=decode[0] / decode[1])]


@torch.no_grad()
def calibrated_quality(model_name: str, calib_samples: int, eval_windows: int, greedy_rounds: int | None = 0,
                       budget: float = 0.01, predictor_ratio: float = 0.0, recall: float = 0.99,
                       neuron_scaling: bool = False, predictor_bits: int = 0, exact_gate: bool = True) -> dict:
    """Calibrate the activation_sparsity pass on `model_name`; held-out perplexity change and inactive share.
    greedy_rounds > 0: per-layer thresholds built up greedily (steps of 10% inactive) instead of one CETT value;
    None: 8 rounds per layer (enough to move every layer to ~80%). predictor_ratio > 0: also a gate predictor of rank
    ratio x hidden, or predictor_bits > 0: the gate's quantized copy (its misses count in the budget); the same
    thresholds without it are measured as well. exact_gate=False (with predictor_bits): the quantized copy is the gate
    itself; what that alone costs (every neuron kept) is measured as well."""
    import compress
    from compress.activation_sparsity import ActivationSparseMLP, ActivationSparsity
    from compress.evaluate import evaluate, heldout_windows

    tok = compress.load_tokenizer(model_name)
    base = compress.load(model_name, dtype="float32")
    if greedy_rounds is None:
        greedy_rounds = 8 * base.config.num_hidden_layers
    rank = 0 if predictor_bits else round(predictor_ratio * base.config.hidden_size)
    spec = ActivationSparsity(outer_steps=8, inner_steps=16, search_tokens=1024, greedy_rounds=greedy_rounds,
                              greedy_step=0.1, target_ppl_increase=budget, predictor_rank=rank,
                              predictor_recall=recall, neuron_scaling=neuron_scaling, predictor_bits=predictor_bits,
                              exact_gate=exact_gate)
    model, report = compress.apply(compress.load(model_name, dtype="float32"), [spec],
                                   calibration={"source": "builtin:calibration", "num_samples": calib_samples,
                                                "seq_len": 256}, tokenizer=tok, progress=False)
    windows = heldout_windows(tok, max_windows=eval_windows)
    mlps = [m for m in model.modules() if isinstance(m, ActivationSparseMLP)]
    d = report.passes[0].details

    def heldout() -> tuple[dict, float]:
        for m in mlps:
            m.record, m.counts = True, [0, 0]
        ev = evaluate(model, windows, base, progress=False)
        inactive = 1 - sum(m.counts[0] for m in mlps) / sum(m.counts[1] for m in mlps)
        return ev, inactive

    ev, inactive = heldout()
    out = dict(model=model_name, ppl_delta_pct=ev["ppl_delta_pct"], ppl_delta_pct_ci95=ev["ppl_delta_pct_ci95"],
               eval_windows=ev["windows"], sparsity=inactive, greedy_rounds=greedy_rounds,
               calibration="per-layer greedy" if greedy_rounds else "one CETT value",
               calibration_ppl_delta_pct=100 * d["ppl_increase"], kl=ev["kl"], cett=d["cett"],
               layer_sparsity=[round(s, 3) for s in d["layer_sparsity"]], predictor_rank=rank,
               predictor_ratio=predictor_ratio, neuron_scaling=neuron_scaling, predictor_bits=predictor_bits,
               exact_gate=exact_gate)
    if not exact_gate:
        saved = [float(m.threshold) for m in mlps]
        for m in mlps:  # threshold 0: every neuron kept, only the quantized gate
            m.threshold.fill_(0.0)
        alone, _ = heldout()
        for m, t in zip(mlps, saved):
            m.threshold.fill_(t)
        out["quantized_gate_alone"] = dict(ppl_delta_pct=alone["ppl_delta_pct"],
                                           ppl_delta_pct_ci95=alone["ppl_delta_pct_ci95"], kl=alone["kl"])
    elif rank or predictor_bits:
        out["candidate_share"] = sum(d["candidate_share"]) / len(mlps)
        saved = [float(m.predictor_threshold) for m in mlps]
        for m in mlps:  # threshold 0: every neuron a candidate, i.e. the same thresholds without the predictor
            m.predictor_threshold.fill_(0.0)
        plain, plain_inactive = heldout()
        for m, t in zip(mlps, saved):
            m.predictor_threshold.fill_(t)
        out["without_predictor"] = dict(ppl_delta_pct=plain["ppl_delta_pct"],
                                        ppl_delta_pct_ci95=plain["ppl_delta_pct_ci95"], sparsity=plain_inactive,
                                        kl=plain["kl"])
    return out


def mlp_at_sparsity(sparsity: float, dtype=torch.float32, device="cpu", predictor_rank: int = 0,
                    candidate_share: float = 1.0, neuron_scaling: bool = False, predictor_bits: int = 0,
                    shape: tuple[int, int] = MLP_SHAPE, exact_gate: bool = True):
    """An MLP of `shape` (hidden, intermediate; Llama-3-8B's by default) with random weights; thresholds set so that
    on N(0,1) x `sparsity` of the neurons are inactive and, with a predictor, `candidate_share` of them are
    candidates (the active ones among them); exact_gate=False: the quantized copy is the gate."""
    from transformers.activations import ACT2FN

    from compress.activation_sparsity import ActivationSparseMLP

    hidden, inter = shape
    mlp = nn.Module()
    mlp.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
    mlp.up_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
    mlp.down_proj = nn.Linear(inter, hidden, bias=False, dtype=dtype, device=device)
    mlp.act_fn = ACT2FN["silu"]

    def quantile(t, q):
        t = t.float().flatten()
        return torch.quantile(t[:: max(1, t.numel() // 1_000_000)], q).item()

    with torch.no_grad():
        for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            p.weight.normal_(0, 0.02)
        sample = torch.randn(64, hidden, dtype=dtype, device=device)
        sparse = ActivationSparseMLP(mlp, max_sparse_tokens=16, predictor_rank=predictor_rank,
                                     predictor_bits=predictor_bits, neuron_scaling=neuron_scaling,
                                     exact_gate=exact_gate).eval()
        if neuron_scaling:  # the per-neuron multiply is timed too; random scales of mean 1
            scale = torch.empty(inter, device=device).log_normal_(0, 0.5)
            sparse.neuron_scale.copy_(scale / scale.mean())
        scores = sparse.scores(mlp.act_fn(mlp.gate_proj(sample)))
        if not exact_gate:
            sparse.fit_predictor()
            sparse.adopt_quantized_gate()  # as the pass leaves it: gate_proj holds the copy (prefill's GEMM)
            sparse.threshold.fill_(quantile(sparse.predicted_scores(sample), sparsity) if sparsity else 0.0)
        elif sparse.has_predictor:
            sparse.fit_predictor()
            predicted = sparse.predicted_scores(sample)
            sparse.predictor_threshold.fill_(quantile(predicted, 1 - candidate_share))
            cand = predicted >= sparse.predictor_threshold
            # among the candidates, keep as many as the model keeps in all (random weights: the predictor's picks
            # say nothing about the exact gate, only the work they cause is modelled)
            sparse.threshold.fill_(quantile(scores[cand], max(0.0, 1 - (1 - sparsity) / candidate_share)))
        else:
            sparse.threshold.fill_(quantile(scores, sparsity))

    def dense(x):
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))

    return dense, sparse  # eval mode: training mode runs the masked dense path


def largest_cache_bytes() -> int:
    """The CPU's largest cache as sysfs reports it (e.g. "491520K"); 32 MiB where it does not."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 << 20)


def cycling(fns):
    """One callable that calls `fns` in turn (each call a different copy of the weights)."""
    turn = itertools.cycle(fns)
    return lambda: next(turn)()


@torch.no_grad()
def cpu_activation_sparse(quality: dict, repeats, copies: int = 0, dtype=torch.float32,
                          prefill_tokens: int = 256) -> list[dict]:
    """Dense vs activation-sparse MLP at one dtype (weights, x and the output; the sparse path computes in float32
    from bf16 weights): decoding (1 and 4 tokens, the gathers) and a prefill of `prefill_tokens` (the masked dense
    path, which must not cost more than the dense MLP; 0: none)."""
    from compress.activation_sparsity import ActivationSparseMLP

    bits = quality.get("predictor_bits", 0)
    if not quality.get("exact_gate", True):  # the quantized copy is the gate: alone (every neuron kept), then sparse
        alone = {**quality, **quality["quantized_gate_alone"], "sparsity": 0.0}
        variants = [(f"int{bits} gate, every neuron", alone, 0, 1.0, bits, False),
                    (f"int{bits} gate", quality, 0, 1.0, bits, False)]
    else:
        variants = [("dense gate", quality.get("without_predictor", quality), 0, 1.0, 0, True)]
        if quality.get("predictor_rank"):
            rank = round(MLP_SHAPE[0] * quality["predictor_ratio"])
            variants.append((f"predictor rank {rank}", quality, rank, quality["candidate_share"], 0, True))
        elif bits:
            variants.append((f"predictor int{bits}", quality, 0, quality["candidate_share"], bits, True))
    mlp_bytes = 3 * MLP_SHAPE[0] * MLP_SHAPE[1] * dtype.itemsize
    copies = copies or max(1, math.ceil(3 * largest_cache_bytes() / mlp_bytes))
    rows = []
    for gate, q, rank, share, bits, exact in variants:
        pairs = [mlp_at_sparsity(q["sparsity"], dtype, predictor_rank=rank, candidate_share=share,
                                 predictor_bits=bits, neuron_scaling=quality.get("neuron_scaling", False),
                                 exact_gate=exact, shape=MLP_SHAPE)
                 for _ in range(copies)]
        sparse = pairs[0][1]
        for t in (1, 4, prefill_tokens) if prefill_tokens else (1, 4):
            x = torch.randn(t, MLP_SHAPE[0], dtype=dtype)
            sparse.record, sparse.counts = True, [0, 0]
            sparse(x)
            sparse.record = False
            measured = 1 - sparse.counts[0] / sparse.counts[1]
            d, s = paired_median_seconds([cycling([lambda f=f: f(x) for f, _ in pairs]),
                                          cycling([lambda f=f: f(x) for _, f in pairs])],
                                         repeats if t <= 4 else max(3, repeats // 2))
            rows.append(dict(device="cpu", kind="activation_sparse_mlp", shape=f"{MLP_SHAPE[0]}x{MLP_SHAPE[1]}",
                             dtype=str(dtype).removeprefix("torch."),
                             tokens=t, gate=gate, speedup_vs_dense=d / s, dense_ms=d * 1e3, ours_ms=s * 1e3,
                             weight_copies=copies,
                             sparsity=measured, candidate_share=share if (rank or bits) and exact else None,
                             ppl_delta_pct=q["ppl_delta_pct"], ppl_delta_pct_ci95=q.get("ppl_delta_pct_ci95"),
                             path=sparse.runtime_path(t),
                             quality_model=quality["model"], kl=q["kl"],
                             calibration_ppl_delta_pct=quality["calibration_ppl_delta_pct"]))
    assert isinstance(sparse, ActivationSparseMLP)
    return rows


@torch.no_grad()
def cpu_gather_crossover(repeats, copies: int = 0, sparsity: float = 0.5) -> list[dict]:
    """Where the CPU row gathers start to pay: the activation-sparse MLP with its gathers forced on (no predictor,
    `sparsity` of the neurons inactive by a plain threshold) vs the dense MLP, 1 token, float32, from builtin:tiny's
    MLP shape up to Llama-3-8B's; weight copies cycled past 3x the largest cache, as at the Llama-3-8B shape.
    What `ActivationSparseMLP.MIN_GATHER_WEIGHTS` (below it: the masked dense path) is set from."""
    rows = []
    for shape in GATHER_CROSSOVER_SHAPES:
        n = copies or max(1, math.ceil(3 * largest_cache_bytes() / (3 * shape[0] * shape[1] * 4)))
        pairs = [mlp_at_sparsity(sparsity, shape=shape) for _ in range(n)]
        for _, sparse in pairs:
            sparse.MIN_GATHER_WEIGHTS = 0  # the gathers at every size (the instance's own, not the class's)
            sparse.column_major_down()  # what building does above the threshold: not inside the timed calls
            assert sparse.down_proj.weight.stride(0) == 1
        x = torch.randn(1, shape[0])
        sparse = pairs[0][1]
        assert sparse.runtime_path(1).startswith("active rows"), sparse.runtime_path(1)
        d, s = paired_median_seconds([cycling([lambda f=f: f(x) for f, _ in pairs]),
                                      cycling([lambda f=f: f(x) for _, f in pairs])], repeats)
        rows.append(dict(device="cpu", kind="gather_crossover", shape=f"{shape[0]}x{shape[1]}", tokens=1,
                         dtype="float32", weights=3 * shape[0] * shape[1], sparsity=sparsity,
                         speedup_vs_dense=d / s, dense_ms=d * 1e3, ours_ms=s * 1e3, weight_copies=n,
                         path=sparse.runtime_path(1),
                         below_min_gather_weights=3 * shape[0] * shape[1] < type(sparse).MIN_GATHER_WEIGHTS))
        print(f"[gather crossover] {shape[0]}x{shape[1]}: {d / s:.2f}x ({n} copies)", file=sys.stderr)
        del pairs
    return rows


# ------------------------------------------------------------------------------------------------ CUDA
def cuda_ms(fn, repeats: int = 50) -> float:
    import triton

    return triton.testing.do_bench(fn, rep=repeats, return_mode="median")


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
def cuda_activation_sparse(quality: dict) -> list[dict]:
    quantized_gate = not quality.get("exact_gate", True)
    bits = quality.get("predictor_bits", 0) if quantized_gate else 0
    # an exact-gate predictor is not timed on CUDA: the dense-gate thresholds
    quality = quality if quantized_gate else {**quality, **quality.get("without_predictor", {})}
    dense, sparse = mlp_at_sparsity(quality["sparsity"], torch.float16, "cuda", predictor_bits=bits,
                                    neuron_scaling=quality.get("neuron_scaling", False), exact_gate=not quantized_gate,
                                    shape=MLP_SHAPE)
    rows = []
    for t in (1, 4):
        x = torch.randn(t, MLP_SHAPE[0], device="cuda", dtype=torch.float16)
        d, s = cuda_ms(lambda: dense(x)), cuda_ms(lambda: sparse(x))
        rows.append(dict(device="cuda", kind="activation_sparse_mlp", shape=f"{MLP_SHAPE[0]}x{MLP_SHAPE[1]}",
                         tokens=t, speedup_vs_dense=d / s, dense_ms=d, ours_ms=s, sparsity=quality["sparsity"],
                         gate=f"int{bits} gate" if bits else "dense gate", path=sparse.runtime_path(t),
                         ppl_delta_pct=quality["ppl_delta_pct"],
                         ppl_delta_pct_ci95=quality.get("ppl_delta_pct_ci95"), quality_model=quality["model"]))
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


def print_table(rows: list[dict]) -> None:
    for device in ("cpu", "cuda"):
        sub = [r for r in rows if r["device"] == device]
        if not sub:
            continue
        print(f"\n{device}: speedup = dense time / ours (> 1: ours faster)")
        print(f"{'kind':<22}{'shape':<36}{'tokens':>7}{'speedup':>9}  extra")
        for r in sub:
            extra = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                     if k in ("dtype", "path", "gate", "sparsity", "candidate_share", "ppl_delta_pct", "rel_err",
                              "weight_copies",
                              "structure", "paths")}
            print(f"{r['kind']:<22}{r['shape']:<36}{r['tokens']:>7}{r['speedup_vs_dense']:>8.2f}x  {extra or ''}")


def linear_shape(text: str) -> tuple[int, int]:
    try:
        out_f, in_f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected OUTxIN, e.g. 14336x4096") from None
    return out_f, in_f


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
    ap.add_argument("--greedy-rounds", type=int, default=0, help="activation sparsity: rounds of per-layer greedy "
                    "threshold moves (0, the default: one CETT value for all layers; the greedy moves overfit the "
                    "calibration text, BENCHMARKS.md)")
    ap.add_argument("--ppl-budget", type=float, default=0.007, help="activation sparsity: perplexity budget on the "
                    "calibration windows (the held-out change is what the rows report)")
    ap.add_argument("--calibration-samples", type=int, default=48, help="activation sparsity: calibration windows "
                    "of 256 tokens (more: slower search, less overfitting of the per-layer thresholds)")
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
    ap.add_argument("--gather-crossover", action="store_true", help="only the gather_crossover rows: the CPU row "
                    "gathers vs the dense MLP from builtin:tiny's MLP shape to Llama-3-8B's (50%% inactive, 1 token)")
    ap.add_argument("--weight-copies", type=int, default=0, help="activation-sparse MLP timing: copies of its "
                    "weights called in turn (0: enough to exceed 3x the largest CPU cache; 1 shows a warm cache)")
    ap.add_argument("--prefill-tokens", type=int, default=256, help="activation-sparse MLP: also time a prefill of "
                    "this many tokens (the masked dense path; 0: none)")
    ap.add_argument("--eval-windows", type=positive_int, default=199, help="activation sparsity: held-out windows "
                    "of 256 tokens for the perplexity change and its 95%% interval")
    ap.add_argument("--save-quality", type=Path, help="write the activation-sparsity calibration result (JSON) here")
    ap.add_argument("--quality", type=Path, help="reuse a --save-quality file instead of calibrating again (the "
                    "slow part: the speed rows then time this machine at that file's inactive shares)")
    args = ap.parse_args(argv)
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
    if args.quality is not None:
        if not args.quality.is_file():
            ap.error(f"--quality {args.quality}: no such file (write one with --save-quality)")
        quality = json.loads(args.quality.read_text())
    else:
        quality = calibrated_quality(args.model, 8 if args.quick else args.calibration_samples,
                                     8 if args.quick else args.eval_windows, 0 if args.quick else args.greedy_rounds,
                                     args.ppl_budget, args.predictor_ratio, args.recall, args.neuron_scaling,
                                     args.predictor_bits, not args.quantized_gate)
    if args.save_quality is not None:
        args.save_quality.write_text(json.dumps(quality, indent=2))
    if not args.no_cpu:
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            rows += cpu_activation_sparse(quality, repeats, args.weight_copies, prefill_tokens=args.prefill_tokens)
            from compress.models import native_dtype

            if native_dtype(torch.bfloat16, "cpu"):  # what `dtype: auto` loads a bf16 checkpoint in on this CPU
                rows += cpu_activation_sparse(quality, repeats, args.weight_copies, torch.bfloat16,
                                              args.prefill_tokens)
            if not args.only_activation_sparse:
                rows += cpu_runtime_dense([1, 8] if args.quick else [1, 8, 64], repeats)
                rows += cpu_e2e_tiny(repeats)
        finally:
            torch.set_num_threads(saved)
    if torch.cuda.is_available() and not args.only_activation_sparse:
        tokens = args.tokens or ([1, 8, 16] if args.quick else [1, 8, 16, 64, 512, 4096])
        shapes = args.shapes or SHAPES
        rows += cuda_layers(tokens, shapes)
        rows += cuda_activation_sparse(quality)
        rows += cuda_e2e()
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"torch {torch.__version__}; CPU rows at 1 thread; activation sparsity calibrated on {args.model}: "
              f"{json.dumps(quality)}")
        print_table(rows)


if __name__ == "__main__":
    run_cli(main)

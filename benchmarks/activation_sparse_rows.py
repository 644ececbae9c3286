"""The activation-sparse MLP's rows of benchmarks/sparse_speed.py (its calibration on the reference model, the CPU and
CUDA timings at Llama-3-8B's MLP shape, the gather crossover): see that script's docstring for what they measure."""
from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from vq_logits import paired_median_seconds  # noqa: E402

MLP_SHAPE = (4096, 14336)  # hidden, intermediate (Llama-3-8B)
# builtin:tiny's MLP, builtin:small's, then wider ones up to Llama-3-8B's (--gather-crossover)
GATHER_CROSSOVER_SHAPES = ((256, 704), (384, 1152), (512, 1536), (1024, 2816), (2048, 5632), (4096, 14336))


def cuda_ms(fn, repeats: int = 50) -> float:
    import triton

    return triton.testing.do_bench(fn, rep=repeats, return_mode="median")


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

    def heldout_with_zero(buffer: str) -> tuple[dict, float]:
        """heldout() with every module's `buffer` (a threshold) at 0, then restored."""
        saved = [float(getattr(m, buffer)) for m in mlps]
        for m in mlps:
            getattr(m, buffer).fill_(0.0)
        try:
            return heldout()
        finally:
            for m, t in zip(mlps, saved):
                getattr(m, buffer).fill_(t)

    ev, inactive = heldout()
    out = dict(model=model_name, ppl_delta_pct=ev["ppl_delta_pct"], ppl_delta_pct_ci95=ev["ppl_delta_pct_ci95"],
               eval_windows=ev["windows"], sparsity=inactive, greedy_rounds=greedy_rounds,
               calibration="per-layer greedy" if greedy_rounds else "one CETT value",
               calibration_ppl_delta_pct=100 * d["ppl_increase"], kl=ev["kl"], cett=d["cett"],
               layer_sparsity=[round(s, 3) for s in d["layer_sparsity"]], predictor_rank=rank,
               predictor_ratio=predictor_ratio, neuron_scaling=neuron_scaling, predictor_bits=predictor_bits,
               exact_gate=exact_gate)
    if not exact_gate:
        alone, _ = heldout_with_zero("threshold")  # every neuron kept: the quantized gate alone
        out["quantized_gate_alone"] = dict(ppl_delta_pct=alone["ppl_delta_pct"],
                                           ppl_delta_pct_ci95=alone["ppl_delta_pct_ci95"], kl=alone["kl"])
    elif rank or predictor_bits:
        out["candidate_share"] = sum(d["candidate_share"]) / len(mlps)
        # every neuron a candidate: the same thresholds without the predictor
        plain, plain_inactive = heldout_with_zero("predictor_threshold")
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
        # the dense MLP's own layout, kept before the sparse one holds down_proj column-major (its gathers read
        # columns): in bf16 that layout multiplies 1.2-1.7x slower, and a baseline on it flattered the sparse rows
        down_row_major = mlp.down_proj.weight.detach().clone()
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
        return F.linear(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), down_row_major)

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

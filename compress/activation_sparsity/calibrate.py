"""Per-layer gate thresholds at a perplexity budget (CATS thresholds, chosen the Sparsing Law way).

Neuron i of an FFN is skipped for a token when |act(gate(x))_i| < tau (CATS: the gate is known before up_proj and
down_proj run, so skipping saves their work), or |act(gate(x))_i| * s_i < tau with neuron scaling (mlp.py). Per
layer, tau comes from a target CETT (the relative output error of the truncation,
compress/prune/activation_sparsity.py): the largest tau whose mean CETT stays within it. Across layers, one CETT
value is searched by bisection: the largest whose thresholds, all applied at once, raise the perplexity on the
calibration windows by at most `target_ppl_increase`; or (`greedy_rounds` > 0) per-layer thresholds are built up one
layer at a time where the budget buys the most sparsity (`_greedy_layers`)."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import CalibrationError
from ..evaluate import budget_base_perplexity, evaluate
from ..prune.activation_sparsity import LayerActivations, down_weight_reader
from ..progress import phase, progress_bar
from .mlp import ActivationSparseMLP


def _forward_with_hooks(model, windows: torch.Tensor, search_tokens: int, batch_size: int, handles) -> None:
    """Run the first `search_tokens` calibration tokens through the model, then remove the hooks."""
    try:
        per_window = windows.shape[1]
        evaluate(model, windows[: max(1, -(-search_tokens // per_window))], batch_size=batch_size, progress=False)
    finally:
        for h in handles:
            h.remove()


def _capture(mlps: list[ActivationSparseMLP], model, windows: torch.Tensor, search_tokens: int, batch_size: int):
    """The first `search_tokens` tokens' down_proj inputs, |act(gate(x))| and (neuron scaling only) |up(x)|, per
    layer, from one forward pass."""
    acts: list[list[torch.Tensor]] = [[] for _ in mlps]
    gates: list[list[torch.Tensor]] = [[] for _ in mlps]
    ups: list[list[torch.Tensor]] = [[] for _ in mlps]

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1, t.shape[-1])

    handles = []
    for i, mlp in enumerate(mlps):
        handles.append(mlp.down_proj.register_forward_pre_hook(lambda mod, args, i=i: acts[i].append(flat(args[0]))))
        # the gate as the module computes it (gate_proj, or its quantized copy when that is the gate)
        handles.append(mlp.register_forward_pre_hook(
            lambda mod, args, i=i: gates[i].append(mod.act_fn(mod.gate_pre(flat(args[0]))).abs())))
        if mlp.neuron_scaling:
            handles.append(mlp.up_proj.register_forward_hook(lambda mod, args, out, i=i: ups[i].append(flat(out))))
    _forward_with_hooks(model, windows, search_tokens, batch_size, handles)
    out = []
    for a, g, u in zip(acts, gates, ups):  # each layer's batches go once joined: not all layers' twice over
        out.append(tuple(torch.cat(t)[:search_tokens] if t else None for t in (a, g, u)))
        a.clear(), g.clear(), u.clear()
    return out


@torch.no_grad()
def calibrate_thresholds(model, mlps: list[ActivationSparseMLP], windows: torch.Tensor,
                         target_ppl_increase: float = 0.01, *, search_tokens: int = 2048, outer_steps: int = 10,
                         inner_steps: int = 20, batch_size: int = 8, greedy_rounds: int = 0, greedy_step: float = 0.05,
                         predictor_recall: float = 0.99, storage_dtype: torch.dtype | None = None,
                         progress: bool = False) -> dict[str, Any]:
    """Set each module's `threshold`; return what was found (thresholds, sparsity per layer, perplexities)."""
    for m in mlps:
        m.threshold.fill_(0.0)
    quantized_gate = [m for m in mlps if not m.exact_gate]
    for m in quantized_gate:  # the original model's perplexity: the budget includes the quantized gate's own cost
        m.exact_gate = True
    try:
        dense_ppl = evaluate(model, windows, batch_size=batch_size, progress=progress)["perplexity"]
    finally:
        for m in quantized_gate:
            m.exact_gate = False
    dense_ppl = budget_base_perplexity(dense_ppl, "activation_sparsity")
    for m in quantized_gate:  # the gate itself: fitted before its activations are captured (gate_proj's weight
        m.fit_predictor(storage_dtype)  # keeps the original values until the copy is adopted, at the end)
    with phase(f"activation sparsity: capturing {search_tokens} tokens' activations", enabled=progress):
        captured, layers = _capture(mlps, model, windows, search_tokens, batch_size), []
    for i, m in enumerate(mlps):
        (acts, gates, ups), captured[i] = captured[i], None  # each layer's gates go once scored
        if m.neuron_scaling:  # before the scores: they include the scales
            m.fit_neuron_scale(ups.float().abs().mean(0), storage_dtype)
        layers.append(LayerActivations(acts, down_weight_reader(m.down_proj), scores=m.scores(gates)))
        del acts, gates, ups
    limit = dense_ppl * (1 + target_ppl_increase)

    def trial(cett: float, taus: list[float] | None = None):
        taus = taus if taus is not None else [layer.threshold_for_cett(cett, inner_steps) for layer in layers]
        for m, tau in zip(mlps, taus):
            m.threshold.fill_(tau)
            m.record, m.counts = True, [0, 0]
        ppl = evaluate(model, windows, batch_size=batch_size, progress=False)["perplexity"]
        for m in mlps:
            m.record = False
        return ppl, taus, [1 - m.counts[0] / max(m.counts[1], 1) for m in mlps]

    best = {"cett": 0.0, "perplexity": dense_ppl, "thresholds": [0.0] * len(mlps), "layer_sparsity": [0.0] * len(mlps)}
    extra: dict[str, Any] = {}
    if quantized_gate:  # what the quantized gate alone costs (every neuron kept)
        with phase("activation_sparsity: scoring the quantized gate alone (every neuron kept)", enabled=progress):
            best["perplexity"], _, best["layer_sparsity"] = trial(0.0, best["thresholds"])
        extra["quantized_gate_ppl_increase"] = cost = best["perplexity"] / dense_ppl - 1
        if not cost <= target_ppl_increase:  # (NaN too: a gate that breaks the model is over any budget)
            bits = quantized_gate[0].predictor_bits
            options = ("predictor_bits: 8, " if bits != 8 else "") + "exact_gate: true, or a larger target_ppl_increase"
            raise CalibrationError(f"activation_sparsity: the int{bits} gate alone (every neuron kept) raises the "
                                   f"calibration perplexity by {100 * cost:.3g}%, over the budget of "
                                   f"{100 * target_ppl_increase:.3g}%: use {options}")
    lo, hi = 0.0, 1.0
    for _ in progress_bar(range(0 if greedy_rounds else outer_steps), description="activation sparsity: threshold "
                          "search", enabled=progress):
        mid = (lo + hi) / 2
        ppl, taus, sparsity = trial(mid)
        if ppl <= limit:
            lo = mid
            best = {"cett": mid, "perplexity": ppl, "thresholds": taus, "layer_sparsity": sparsity}
        else:
            hi = mid
    if greedy_rounds:
        scores = [layer.scores for layer in layers]
        best = _greedy_layers(trial, scores, best, limit, greedy_rounds, greedy_step, progress)
    for m, tau in zip(mlps, best["thresholds"]):
        m.threshold.fill_(tau)
    predicting = [m for m in mlps if m.has_predictor and m.exact_gate]
    if predicting:  # fit after the thresholds; the budget check then includes its misses
        best["candidate_share"] = _fit_predictors(model, predicting, windows, search_tokens, batch_size,
                                                  predictor_recall, storage_dtype)
        best["perplexity"], _, best["layer_sparsity"] = trial(0.0, best["thresholds"])
        if not best["perplexity"] <= limit:  # (NaN too)
            best.update(_within_budget(predicting, trial, best["thresholds"], limit, outer_steps))
        best["predictor_thresholds"] = [float(m.predictor_threshold) for m in predicting]
    for m in quantized_gate:  # accepted: gate_proj's weight holds the copy from now on
        m.adopt_quantized_gate()
    return {**best, **extra, "perplexity_dense": dense_ppl, "ppl_increase": best["perplexity"] / dense_ppl - 1,
            "sparsity": sum(best["layer_sparsity"]) / len(mlps), "target_ppl_increase": target_ppl_increase,
            "tokens": int(windows.numel())}


def _within_budget(mlps: list[ActivationSparseMLP], trial, thresholds: list[float], limit: float,
                   steps: int) -> dict[str, Any]:
    """The predictor's misses took perplexity past the budget: scale every predictor threshold by the largest factor
    in [0, 1] that stays within it (bisection; factor 0 makes every neuron a candidate: the thresholds alone, which
    the search kept within the budget)."""
    fitted = [float(m.predictor_threshold) for m in mlps]

    def set_scale(factor: float) -> None:
        for m, t in zip(mlps, fitted):
            m.predictor_threshold.fill_(t * factor)

    lo, hi = 0.0, 1.0
    found: dict[str, Any] = {}
    for _ in range(steps):
        mid = (lo + hi) / 2
        set_scale(mid)
        ppl, _, sparsity = trial(0.0, thresholds)
        if ppl <= limit:
            lo, found = mid, {"perplexity": ppl, "layer_sparsity": sparsity}
        else:
            hi = mid
    set_scale(lo)
    if not found:  # no factor above 0 fits: every neuron a candidate
        ppl, _, sparsity = trial(0.0, thresholds)
        found = {"perplexity": ppl, "layer_sparsity": sparsity}
    return {**found, "predictor_threshold_scale": lo}


def _greedy_layers(trial, scores: list[torch.Tensor], best: dict, limit: float, rounds: int, step: float,
                   progress: bool) -> dict:
    """Per-layer thresholds built up from zero, one layer at a time: each round tries `step` more inactive neurons
    in every layer (its threshold the matching quantile of its captured gate scores) and keeps the one that raises
    the calibration perplexity least, while it stays within the budget; a round where nothing fits halves the step.
    Layers differ in how much truncation they tolerate, which one CETT value for all cannot exploit (builtin:tiny,
    +1% budget: 40% inactive with one CETT value, 53% this way). Costs `rounds` x layers evaluations."""
    samples = [s.flatten()[:: max(1, s.numel() // 1_000_000)].float() for s in scores]  # torch.quantile's size limit
    target = list(best["layer_sparsity"])
    for _ in progress_bar(range(rounds), description="activation sparsity: per-layer greedy", enabled=progress):
        tried = []
        for i in range(len(target)):
            if target[i] + step >= 0.995:
                continue
            taus = list(best["thresholds"])
            taus[i] = torch.quantile(samples[i], target[i] + step).item()
            ppl, taus, sparsity = trial(0.0, taus)
            if ppl <= limit:
                tried.append((ppl, i, taus, sparsity))
        if not tried:
            step /= 2
            if step < 0.005:
                break
            continue
        ppl, i, taus, sparsity = min(tried, key=lambda c: c[0])
        target[i] += step
        best = {"cett": best["cett"], "perplexity": ppl, "thresholds": taus, "layer_sparsity": sparsity}
    return best


@torch.no_grad()
def _fit_predictors(model, mlps: list[ActivationSparseMLP], windows: torch.Tensor, search_tokens: int,
                    batch_size: int, recall: float, storage_dtype: torch.dtype | None) -> list[float]:
    """Fit each gate predictor (SVD or quantized copy) and set its threshold so that, on the calibration tokens, a
    share `recall` of the neurons the exact gate keeps are candidates; returns each layer's candidate share."""
    inputs: list[list[torch.Tensor]] = [[] for _ in mlps]
    handles = [m.gate_proj.register_forward_pre_hook(
        lambda mod, args, i=i: inputs[i].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for i, m in enumerate(mlps)]
    _forward_with_hooks(model, windows, search_tokens, batch_size, handles)
    shares = []
    for m, xs in zip(mlps, inputs):
        x = torch.cat(xs)[:search_tokens]
        m.fit_predictor(storage_dtype)
        exact = m.scores(m.act_fn(m.gate_proj(x))).float()
        predicted = m.predicted_scores(x).float()
        kept = predicted[exact >= float(m.threshold)]
        kept = kept[:: max(1, kept.numel() // 1_000_000)]  # torch.quantile's size limit
        m.predictor_threshold.fill_(float(torch.quantile(kept, 1 - recall)) if kept.numel() else 0.0)
        shares.append(float((predicted >= float(m.predictor_threshold)).float().mean()))
    return shares

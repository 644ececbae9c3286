"""Activation sparsity reachable at a small perplexity cost: CETT-PPL-1% of the Sparsing Law paper (Luo et al. 2024,
"Sparsing Law: Towards Large Language Models with Greater Activation Sparsity").

An FFN computes y = sum_i a_i d_i, with a = act(gate(x)) * up(x) the neuron activations and d_i the i-th column of
the down projection. Neuron i is inactive for a token when its output norm |a_i| ||d_i|| is below a layer threshold
tau. The cumulative error of tail truncation is CETT(tau) = ||sum_{inactive} a_i d_i|| / ||y||, averaged over tokens.

Two nested binary searches:
- inner: for a CETT value c, per layer, the largest tau whose mean CETT does not exceed c;
- outer: the largest c whose thresholds, applied to every FFN at once, raise held-out perplexity by at most
  `target_ppl_increase` (1% by default).
The result is the fraction of (token, neuron) pairs inactive at that c, per layer and in total."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModelError


def ffn_down_projections(model: nn.Module) -> list[nn.Module]:
    """The down projection of every decoder layer's gated FFN (Llama, Mistral, Qwen2, Qwen3 layout)."""
    from ..sequential import decoder_layers

    _, layers = decoder_layers(model)
    downs = [getattr(getattr(layer, "mlp", None), "down_proj", None) for layer in layers]
    if any(d is None for d in downs):
        raise UnsupportedModelError("activation sparsity needs gated FFNs with `mlp.down_proj` in every decoder layer")
    return downs


def down_weight_reader(module: nn.Module):
    """A function giving the float32 [out, in] weight a down projection computes with: dense, pruned (packed), or
    quantized (its dequantized weight: an int4 checkpoint's `eval --activation-sparsity` ended in an AttributeError
    traceback); None where it has none to read. A LoRA adapter kept unmerged (recover, merge: false) counts: its
    wrapper's `weight` is the base layer's alone."""
    base = getattr(module, "base_layer", None)
    if base is not None and hasattr(module, "get_delta_weight"):
        read = down_weight_reader(base)
        if read is None or module.merged or module.disable_adapters:
            return read
        names = [name for name in module.active_adapters if name in module.lora_A]
        return lambda: read() + sum(module.get_delta_weight(name).detach().float() for name in names)
    if hasattr(module, "dense_weight"):
        return lambda: module.dense_weight(torch.float32)
    if hasattr(module, "dequantized_weight"):
        return lambda: module.dequantized_weight().detach().float()
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return lambda: weight.detach().float()
    return None


def down_weight(module: nn.Module) -> torch.Tensor:
    reader = down_weight_reader(module)
    if reader is None:
        raise _unreadable(module)
    return reader()


def check_down_weights(model: nn.Module) -> None:
    """Before any work: every down projection's weight can be read (`down_weight`)."""
    unreadable = next((d for d in ffn_down_projections(model) if down_weight_reader(d) is None), None)
    if unreadable is not None:
        raise _unreadable(unreadable)


def _unreadable(module: nn.Module) -> UnsupportedModelError:
    return UnsupportedModelError(f"activation sparsity reads the MLPs' down_proj weights, and a "
                                 f"{type(module).__name__} has none it can read")


class LayerActivations:
    """One layer's captured activations with what every CETT evaluation reuses: the full output norms ||y||.
    The neuron output norms |a_i| ||d_i|| are what the threshold compares, or `scores` instead (the
    activation_sparsity pass thresholds the gate activation |act(gate(x))|, known before up_proj runs).

    Held between searches: the activations and scores in the dtype they were computed in (a bf16 model's are exact
    in bf16) and the down weight as a tensor or a function reading it. The float32 working copies (activations,
    weight, magnitudes) exist only during one `threshold_for_cett`: kept for every layer through the whole search,
    at 7B shapes that is ~0.47 GB a layer by arithmetic (2048 tokens x 14336 x 4 B twice, plus the weight)."""

    def __init__(self, acts: torch.Tensor, weight, scores: torch.Tensor | None = None):
        self.acts, self.weight, self.scores = acts, weight, scores
        acts32, w, magnitude = self._working()
        self.full = F.linear(acts32, w).norm(dim=-1).clamp_min(1e-12)
        self.max_magnitude = float(magnitude.max())
        self._cache: dict[float, float] = {}  # the outer search's bisections share their first midpoints

    def _working(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(float32 activations [tokens, in], weight [out, in], magnitudes [tokens, in]) for one search."""
        acts = self.acts.float()
        w = (self.weight() if callable(self.weight) else self.weight).to(acts.device, torch.float32)
        magnitude = acts.abs() * w.norm(dim=0) if self.scores is None else self.scores.float()
        return acts, w, magnitude

    def mean_cett(self, tau: float, working: tuple | None = None) -> float:
        """Mean over tokens of ||truncated output|| / ||full output|| when neurons with |a| ||d|| < tau are dropped."""
        if tau not in self._cache:
            acts, w, magnitude = working or self._working()
            dropped = acts * (magnitude < tau)
            self._cache[tau] = float((F.linear(dropped, w).norm(dim=-1) / self.full).mean())
        return self._cache[tau]

    def threshold_for_cett(self, cett: float, steps: int = 20) -> float:
        """Inner search: the largest tau with mean CETT <= cett (CETT grows with tau)."""
        working = None
        lo, hi = 0.0, self.max_magnitude * 1.0001
        for _ in range(steps):
            mid = (lo + hi) / 2
            if mid not in self._cache and working is None:
                working = self._working()
            if self.mean_cett(mid, working) <= cett:
                lo = mid
            else:
                hi = mid
        return lo


class _Truncation:
    """Pre-hooks on the down projections that zero inactive neurons and count them."""

    def __init__(self, downs: list[nn.Module], norms: list[torch.Tensor]):
        self.downs, self.norms = downs, norms
        self.taus: list[float] | None = None
        self.inactive = [0] * len(downs)
        self.seen = [0] * len(downs)
        self.captured: list[list[torch.Tensor]] | None = None
        self.handles = [d.register_forward_pre_hook(self._hook(i)) for i, d in enumerate(downs)]

    def _hook(self, i: int):
        def hook(module, args):
            a = args[0]
            if self.captured is not None:
                self.captured[i].append(a.detach().reshape(-1, a.shape[-1]))  # (in its dtype: exact)
            if self.taus is None:
                return None
            drop = (a.abs() * self.norms[i].to(a.device, a.dtype)) < self.taus[i]
            self.inactive[i] += int(drop.sum())
            self.seen[i] += drop.numel()
            return (a.masked_fill(drop, 0.0),) + tuple(args[1:])
        return hook

    def reset_counts(self) -> None:
        self.inactive = [0] * len(self.downs)
        self.seen = [0] * len(self.downs)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def activation_sparsity(
    model: nn.Module,
    windows: torch.Tensor,
    target_ppl_increase: float = 0.01,
    *,
    search_tokens: int = 2048,
    outer_steps: int = 10,
    inner_steps: int = 20,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """FFN neuron sparsity reachable at `target_ppl_increase` relative perplexity increase on `windows`
    ([n, seq_len] token ids, e.g. `compress.evaluate.heldout_windows(tokenizer)`).

    Thresholds are searched on the activations of the first `search_tokens` tokens of `windows`; perplexity and
    the reported sparsity are measured on all of `windows` with the thresholds applied."""
    from ..evaluate import budget_base_perplexity, evaluate

    if not 0 < target_ppl_increase < 1:
        raise ConfigError(f"target_ppl_increase is a fraction like 0.01 (1%), got {target_ppl_increase}")
    downs = ffn_down_projections(model)
    norms = [down_weight(d).norm(dim=0) for d in downs]
    trunc = _Truncation(downs, norms)
    try:
        trunc.captured = [[] for _ in downs]
        per_window = windows.shape[1]
        search_windows = windows[: max(1, -(-search_tokens // per_window))]
        evaluate(model, search_windows, batch_size=batch_size, progress=False)
        layers = []
        for c, d in zip(trunc.captured, downs):  # each layer's batches go once joined
            layers.append(LayerActivations(torch.cat(c)[:search_tokens], down_weight_reader(d)))
            c.clear()
        trunc.captured = None
        dense_ppl = evaluate(model, windows, batch_size=batch_size, progress=progress)["perplexity"]
        dense_ppl = budget_base_perplexity(dense_ppl, "activation sparsity")
        limit = dense_ppl * (1 + target_ppl_increase)

        def trial(cett: float):
            taus = [layer.threshold_for_cett(cett, inner_steps) for layer in layers]
            trunc.taus = taus
            trunc.reset_counts()
            ppl = evaluate(model, windows, batch_size=batch_size, progress=False)["perplexity"]
            counts = (list(trunc.inactive), list(trunc.seen))
            trunc.taus = None
            return ppl, taus, counts

        best = (0.0, dense_ppl, [0.0] * len(downs), ([0] * len(downs), [1] * len(downs)))
        lo, hi = 0.0, 1.0
        for _ in range(outer_steps):
            mid = (lo + hi) / 2
            ppl, taus, counts = trial(mid)
            if ppl <= limit:
                lo, best = mid, (mid, ppl, taus, counts)
            else:
                hi = mid
    finally:
        trunc.remove()
    cett, ppl, taus, (inactive, seen) = best
    layer = [i / s for i, s in zip(inactive, seen)]
    return {
        "cett": cett,
        "target_ppl_increase": target_ppl_increase,
        "perplexity_dense": dense_ppl,
        "perplexity": ppl,
        "ppl_increase": ppl / dense_ppl - 1,
        "layer_sparsity": layer,
        "sparsity": sum(inactive) / max(sum(seen), 1),
        "thresholds": taus,
        "tokens": int(windows.numel()),
    }

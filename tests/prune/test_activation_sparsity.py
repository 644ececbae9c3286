"""Activation sparsity (CETT-PPL): the inner threshold search meets its CETT, and the outer search's answer is
checked by re-running the model with the returned thresholds (perplexity within the budget, same sparsity)."""
import copy
import math

import pytest
import torch

from compress.errors import CalibrationError, ConfigError
from compress.evaluate import evaluate, exp_or_inf, heldout_windows
from compress.prune.activation_sparsity import LayerActivations, activation_sparsity, ffn_down_projections


def test_inner_search_finds_the_largest_threshold_within_the_cett():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(200, 64, generator=g) * torch.rand(64, generator=g)
    weight = torch.randn(16, 64, generator=g)
    layer = LayerActivations(acts, weight)
    for cett in (0.05, 0.2, 0.5):
        tau = layer.threshold_for_cett(cett, steps=30)
        assert layer.mean_cett(tau) <= cett < layer.mean_cett(tau * 1.05 + 1e-6)
        # independent CETT in float64 (the drop decision in float32, as searched: ties at tau must agree)
        drop = acts.abs() * weight.norm(dim=0) < tau
        a, w = acts.double(), weight.double()
        ref = ((a * drop) @ w.t()).norm(dim=1) / (a @ w.t()).norm(dim=1)
        assert float(ref.mean()) == pytest.approx(layer.mean_cett(tau), rel=1e-4)


def test_bf16_activations_are_held_as_captured_and_searched_as_their_float32_copies():
    # float32 copies of every layer's activations, magnitudes and transposed down weight were held through the
    # whole search; a bf16 model's activations are exact in bf16 and the float32 working
    # set now lives for one inner search
    g = torch.Generator().manual_seed(1)
    acts = (torch.randn(300, 96, generator=g) * torch.rand(96, generator=g)).bfloat16()
    weight = torch.randn(24, 96, generator=g)
    reads = []

    def read():
        reads.append(1)
        return weight

    held = LayerActivations(acts, read)
    reference = LayerActivations(acts.float(), weight)
    for cett in (0.05, 0.3):
        assert held.threshold_for_cett(cett, steps=16) == reference.threshold_for_cett(cett, steps=16)
    tensors = [v for v in vars(held).values() if isinstance(v, torch.Tensor)]
    assert held.acts is acts and all(t.numel() <= acts.numel() for t in tensors)
    assert sum(t.numel() * t.element_size() for t in tensors) <= acts.numel() * 2 + 300 * 4
    assert len(reads) == 3  # once to set up, once per search (not once per step)


@pytest.fixture(scope="module")
def small_windows(reference_tokenizer):
    return heldout_windows(reference_tokenizer, seq_len=128, max_windows=4)


def test_reported_sparsity_holds_within_the_perplexity_budget(reference_model, small_windows):
    result = activation_sparsity(reference_model, small_windows, 0.01, search_tokens=256, outer_steps=6,
                                 inner_steps=14)
    assert len(result["layer_sparsity"]) == 6 and 0 < result["sparsity"] < 1
    assert result["cett"] > 0 and result["ppl_increase"] <= 0.01

    # re-run with the returned thresholds through our own hooks
    downs = ffn_down_projections(reference_model)
    counts = [[0, 0] for _ in downs]

    def hook(i, tau, norms):
        def fn(module, args):
            drop = args[0].abs() * norms < tau
            counts[i][0] += int(drop.sum())
            counts[i][1] += drop.numel()
            return (args[0].masked_fill(drop, 0.0),)
        return fn

    handles = [d.register_forward_pre_hook(hook(i, tau, d.weight.detach().norm(dim=0)))
               for i, (d, tau) in enumerate(zip(downs, result["thresholds"]))]
    try:
        ppl = evaluate(reference_model, small_windows, progress=False)["perplexity"]
    finally:
        for h in handles:
            h.remove()
    dense = evaluate(reference_model, small_windows, progress=False)["perplexity"]
    assert dense == pytest.approx(result["perplexity_dense"], rel=1e-9)
    assert ppl == pytest.approx(result["perplexity"], rel=1e-9) and ppl <= dense * 1.01
    for (inactive, seen), reported in zip(counts, result["layer_sparsity"]):
        assert inactive / seen == pytest.approx(reported)

    looser = activation_sparsity(reference_model, small_windows, 0.05, search_tokens=256, outer_steps=6,
                                 inner_steps=14)
    assert looser["sparsity"] >= result["sparsity"] and looser["ppl_increase"] <= 0.05


def test_bad_target_is_a_config_error(reference_model, small_windows):
    with pytest.raises(ConfigError, match="fraction"):
        activation_sparsity(reference_model, small_windows, target_ppl_increase=1.5)


def test_a_non_finite_dense_perplexity_is_refused(reference_model, small_windows):
    assert math.isnan(exp_or_inf(float("nan"))) and exp_or_inf(800.0) == math.inf
    damaged = copy.deepcopy(reference_model)
    with torch.no_grad():
        damaged.model.layers[1].mlp.down_proj.weight[3, 4] = float("inf")
    with pytest.raises(CalibrationError, match="perplexity on the calibration text is (nan|inf)"):
        activation_sparsity(damaged, small_windows, search_tokens=128, outer_steps=2, inner_steps=4)

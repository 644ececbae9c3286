"""The activation_sparsity pass: the sparse decode path computes the masked dense MLP exactly, thresholds meet the
perplexity budget, the checkpoint reloads the thresholds, the recipe runs, mistakes are clear errors."""
from pathlib import Path

import pytest
import torch

import compress
from compress.activation_sparsity import ActivationSparseMLP, ActivationSparsity
from compress.calibration import CalibrationSpec

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "activation-sparse.yaml"
FAST = dict(outer_steps=3, inner_steps=8, search_tokens=128)
CALIB = {"source": "builtin:calibration", "num_samples": 2, "seq_len": 64}


def mlps(model):
    return [m for m in model.modules() if isinstance(m, ActivationSparseMLP)]


@pytest.mark.parametrize("kernels", ["torch", "default"])
def test_sparse_path_equals_masked_dense_and_original(tiny_model, monkeypatch, kernels):
    if kernels == "torch":
        monkeypatch.setenv("COMPRESS_KERNELS", "torch")  # the torch reference gathers instead of the C kernel
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 64)
    with torch.no_grad():
        original = mlp(x)
        sparse = ActivationSparseMLP(mlp, threshold=0.0, max_sparse_tokens=4)
        torch.testing.assert_close(sparse(x), original, rtol=1e-5, atol=1e-6)  # threshold 0 keeps every neuron
        g = mlp.act_fn(mlp.gate_proj(x))
        sparse.threshold.fill_(float(g.abs().median()))
        keep = g.abs() >= sparse.threshold
        expected = mlp.down_proj(g * mlp.up_proj(x) * keep)
        fast = sparse(x)                              # 3 tokens <= 4: only active rows are read
        sparse.max_sparse_tokens = 0
        masked = sparse(x)                            # the dense path with the same mask
    assert sparse.runtime_path(1) == "masked dense"
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fast, original, atol=1e-4)  # the threshold did drop neurons


def test_pass_meets_budget_and_reloads(tmp_path, reference_tokenizer):
    model = compress.load("builtin:tiny")
    ids = torch.randint(0, 8192, (1, 12), generator=torch.Generator().manual_seed(0))
    model, report = compress.apply(model, [ActivationSparsity(target_ppl_increase=0.02, **FAST)], calibration=CALIB,
                                   tokenizer=reference_tokenizer, progress=False)
    d = report.passes[0].details
    assert len(mlps(model)) == 6 and len(d["thresholds"]) == 6
    assert 0 < d["ppl_increase"] <= 0.02 and d["sparsity"] > 0.2
    assert [float(m.threshold) for m in mlps(model)] == pytest.approx(d["thresholds"])
    reloaded = compress.load(compress.save(model, tmp_path / "as"))
    assert [float(m.threshold) for m in mlps(reloaded)] == pytest.approx(d["thresholds"], rel=1e-6)
    assert mlps(reloaded)[0].runtime_path(1).startswith("active rows only")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        fast = reloaded.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        for m in mlps(reloaded):
            m.max_sparse_tokens = 0
        slow = reloaded.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(fast, slow)  # decoding through the gathers gives the masked model's tokens


def test_greedy_per_layer_thresholds_meet_budget(reference_tokenizer):
    """greedy_rounds: per-layer thresholds built up from zero, each move kept only within the budget."""
    model, report = compress.apply(compress.load("builtin:tiny"),
                                   [ActivationSparsity(target_ppl_increase=0.02, greedy_rounds=3, greedy_step=0.1,
                                                       **FAST)],
                                   calibration=CALIB, tokenizer=reference_tokenizer, progress=False)
    d = report.passes[0].details
    assert d["cett"] == 0.0 and d["ppl_increase"] <= 0.02  # no CETT bisection; within the budget
    assert sum(s > 0.05 for s in d["layer_sparsity"]) <= 3  # three moves, one layer each
    assert 0.1 * 0.8 < max(d["layer_sparsity"]) and [float(m.threshold) for m in mlps(model)] == \
        pytest.approx(d["thresholds"])


def test_recipe_runs(reference_tokenizer):
    recipe = compress.Recipe.from_yaml(RECIPE)
    assert recipe.passes[0].name == "activation_sparsity"
    recipe.calibration = CalibrationSpec(**CALIB)
    recipe.passes[0].args.update(FAST)
    model, report = compress.apply(compress.load(recipe.model), recipe, tokenizer=reference_tokenizer, progress=False)
    assert report.passes[0].details["ppl_increase"] <= 0.01 and len(mlps(model)) == 6


def test_user_errors(reference_tokenizer):
    with pytest.raises(compress.ConfigError, match="match no gated MLP"):
        compress.apply(compress.load("builtin:tiny"), [ActivationSparsity(targets=[r"re:.*\.q_proj"])],
                       calibration=CALIB, tokenizer=reference_tokenizer, progress=False)
    with pytest.raises(compress.CalibrationError):
        compress.apply(compress.load("builtin:tiny"), [ActivationSparsity()], progress=False)
    with pytest.raises(compress.ConfigError, match="target_ppl_increase"):
        ActivationSparsity(target_ppl_increase=1.5)

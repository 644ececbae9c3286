"""Linears fed the same tensor (q/k/v, gate/up) share one input accumulator (compress/hessian.py): SparseGPT, GPTQ
and Wanda give exactly what one accumulator per Linear gave, with 4 accumulators a Llama layer instead of 7."""
import copy

import pytest
import torch

import compress
import compress.hessian as hessian

CALIBRATION = {"source": "builtin:calibration", "num_samples": 8, "seq_len": 64}


@pytest.mark.parametrize("passes", [
    [{"pass": "prune", "method": "sparsegpt", "sparsity": 0.5}],
    [{"pass": "prune", "method": "wanda", "structure": "2:4"}],
    [{"pass": "quantize", "method": "gptq", "bits": 4, "group_size": 64}],
], ids=["sparsegpt", "wanda", "gptq"])
def test_shared_statistics_give_the_same_model(passes, reference_model, reference_tokenizer, monkeypatch,
                                                script_module):
    # the previous accumulation, one accumulator per Linear each reading its own input (the benchmark's baseline)
    one_per_module = script_module("benchmarks/shared_hessians.py").one_per_module
    steps = [compress.get_pass(p["pass"])(**{k: v for k, v in p.items() if k != "pass"}) for p in passes]
    counts = []
    shared_fn = hessian.input_statistics

    def counting(step, modules, make):
        accs = shared_fn(step, modules, make)
        counts.append(len({id(a) for a in accs.values()}))
        return accs

    for module in ("compress.prune.pass_", "compress.quantize.pass_"):
        monkeypatch.setattr(f"{module}.input_statistics", counting)
    shared, _ = compress.apply(copy.deepcopy(reference_model), steps, tokenizer=reference_tokenizer,
                               calibration=CALIBRATION, progress=False)
    assert counts == [4] * reference_model.config.num_hidden_layers  # q/k/v one, o, gate/up one, down
    for module in ("compress.prune.pass_", "compress.quantize.pass_"):
        monkeypatch.setattr(f"{module}.input_statistics", one_per_module)
    steps = [compress.get_pass(p["pass"])(**{k: v for k, v in p.items() if k != "pass"}) for p in passes]
    separate, _ = compress.apply(copy.deepcopy(reference_model), steps, tokenizer=reference_tokenizer,
                                 calibration=CALIBRATION, progress=False)
    a, b = shared.state_dict(), separate.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class Batches:
    """A LayerStep stand-in: `run(hooks)` replays `calls` (batch -> [(module, input)]) with the hooks attached."""

    def __init__(self, calls):
        self.calls, self.runs = calls, 0

    def run(self, hooks):
        self.runs += 1
        handles = [m.register_forward_hook(h) for m, h in hooks.items()]
        try:
            for batch in self.calls:
                for module, x in batch:
                    module(x)
        finally:
            for h in handles:
                h.remove()


def per_module(calls, modules):
    """The reference: each module's own inputs, accumulated alone."""
    out = {}
    for name, module in modules.items():
        acc = hessian.HessianAccumulator(4, "cpu")
        for batch in calls:
            for m, x in batch:
                if m is module:
                    acc.add(x)
        out[name] = acc
    return out


@pytest.mark.parametrize("pattern", ["shared", "follower skipped later", "called twice", "first called late",
                                     "never called", "skipped, then twice", "leader twice on one tensor"])
def test_calls_that_do_not_pair_throughout_get_their_own_statistics(pattern):
    """A module skipped in a later batch (or first called late, or called twice on other tensors) took its leader's
    statistics, tokens it never saw; a module never called was missing (KeyError in the passes, where the check
    named it before): a reviewer's finds. Each module's statistics are its own inputs' whatever the pattern."""
    a, b, c = (torch.nn.Linear(4, 4) for _ in range(3))
    x1, x2, y = torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 4)
    calls = {"shared": [[(a, x1), (b, x1), (c, y)], [(a, x2), (b, x2), (c, y)]],
             "follower skipped later": [[(a, x1), (b, x1)], [(a, x2)]],
             "called twice": [[(a, x1), (b, x1), (b, y)], [(a, x2), (b, x2), (b, y)]],
             "first called late": [[(a, x1)], [(a, x2), (b, x2)]],
             "never called": [[(a, x1)], [(a, x2)]],
             # as many rows as its leader's in all, but not the same ones (a reviewer's find: counts alone passed it)
             "skipped, then twice": [[(a, x1)], [(a, x2), (b, x2), (b, x2)]],
             "leader twice on one tensor": [[(a, x1), (a, x1), (b, x1)], [(a, x2), (a, x2), (b, x2)]]}[pattern]
    modules = {"a": a, "b": b, "c": c}
    step = Batches(calls)
    got = hessian.input_statistics(step, modules, lambda m: hessian.HessianAccumulator(m.in_features, "cpu"))
    want = per_module(calls, modules)
    assert list(got) == ["a", "b", "c"]
    for name in modules:
        assert got[name].tokens == want[name].tokens, name
        torch.testing.assert_close(got[name].hessian, want[name].hessian, rtol=0, atol=1e-6)
    assert (got["a"] is got["b"]) == (pattern == "shared") and step.runs == (1 if pattern in ("shared", "never called")
                                                                             else 2)


@pytest.mark.parametrize("method", ["sparsegpt", "gptq"])
def test_a_linear_no_calibration_token_reaches_is_named(method, reference_model, reference_tokenizer):
    """An expert no token is routed to, a Linear a layer holds but never calls: the passes name it (a KeyError once
    its accumulator was made only by its first call, a reviewer's find)."""
    from compress.errors import ConfigError

    model = copy.deepcopy(reference_model)
    model.model.layers[0].mlp.unused = torch.nn.Linear(64, 64, bias=False)
    step = (compress.get_pass("prune")(method="sparsegpt", sparsity=0.5) if method == "sparsegpt"
            else compress.get_pass("quantize")(method="gptq", bits=4, group_size=64))
    with pytest.raises(ConfigError, match="model.layers.0.mlp.unused saw no calibration inputs"):
        compress.apply(model, [step], tokenizer=reference_tokenizer, calibration=CALIBRATION, progress=False)


def test_every_architecture_shares_and_gives_the_same_bits(arch, tiny_model, reference_tokenizer, script_module,
                                                          monkeypatch):
    """Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms after the projections): q/k/v and gate/up read one
    tensor in each, and SparseGPT's result is the same bits either way."""
    one_per_module = script_module("benchmarks/shared_hessians.py").one_per_module
    base = tiny_model(arch, vocab_size=8192)  # (the reference tokenizer's ids)
    counts, shared_fn, results = [], hessian.input_statistics, []
    for fn in (shared_fn, one_per_module):
        def counting(step, modules, make, fn=fn):
            accs = fn(step, modules, make)
            counts.append(len({id(a) for a in accs.values()}))
            return accs

        monkeypatch.setattr("compress.prune.pass_.input_statistics", counting)
        model, _ = compress.apply(copy.deepcopy(base), [compress.get_pass("prune")(method="sparsegpt", sparsity=0.5)],
                                  tokenizer=reference_tokenizer, progress=False,
                                  calibration={"source": "builtin:calibration", "num_samples": 4, "seq_len": 32})
        results.append(model.state_dict())
    layers = base.config.num_hidden_layers
    assert counts == [4] * layers + [7] * layers
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key

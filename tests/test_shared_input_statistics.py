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


def test_a_module_that_stops_sharing_its_input_is_refused():
    """A layer that feeds two Linears one tensor in the first batch and two in the next: said, not mixed up."""
    from compress.errors import CompressError

    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    class Step:
        def run(self, hooks):
            handles = [m.register_forward_hook(h) for m, h in hooks.items()]
            x = torch.randn(2, 4)
            first(x), second(x)
            first(x), second(x.clone())
            for h in handles:
                h.remove()

    with pytest.raises(CompressError, match="second read first's input in one calibration batch"):
        hessian.input_statistics(Step(), {"first": first, "second": second},
                                 lambda m: hessian.HessianAccumulator(m.in_features, "cpu"))

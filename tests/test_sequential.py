"""The sequential runner: layer-by-layer propagation equals the full forward, on every supported architecture."""
from __future__ import annotations

import torch

from compress.sequential import decoder_layers, run_sequential


def _final_hidden(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    # hidden_states[-1] has the final norm applied; the input of that norm is what the last layer produced
    return out.hidden_states


def test_propagation_matches_full_forward_when_nothing_changes(arch, tiny_model):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(1))
    expected = _final_hidden(model, ids)
    seen_inputs, outputs = [], []

    def on_layer(step):
        seen_inputs.append(torch.cat(step.inputs))
        outputs.append(torch.cat(step.run()))

    run_sequential(model, ids, on_layer, batch_size=2, progress=False)
    n = len(decoder_layers(model)[1])
    assert len(seen_inputs) == n
    for i in range(n):  # hidden_states[i] is the input of layer i
        torch.testing.assert_close(seen_inputs[i], expected[i], rtol=1e-5, atol=1e-5)
    final = model.model.norm(outputs[-1])
    torch.testing.assert_close(final, expected[-1], rtol=1e-5, atol=1e-5)


def test_sliding_and_full_layers_each_get_their_own_mask(tiny_model):
    """Qwen with `use_sliding_window` mixes full and sliding layers, and the model passes each its own mask: the
    runner gave every layer layer 0's (full) mask, so sliding layers were calibrated on full attention."""
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    types = list(model.config.layer_types)
    assert types[0] == "full_attention" and "sliding_attention" in types[1:]
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1))  # longer than the window
    expected = _final_hidden(model, ids)
    seen = []
    run_sequential(model, ids, lambda step: seen.append(torch.cat(step.inputs)), batch_size=2, progress=False)
    for i in range(len(types)):
        torch.testing.assert_close(seen[i], expected[i], rtol=1e-5, atol=1e-5)
    assert list(model.config.layer_types) == types  # restored after the capture


def test_changes_to_a_layer_reach_the_next_layers(tiny_model):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    inputs_of_last = []

    def on_layer(step):
        if step.index == 0:
            step.layer.mlp.down_proj.weight.data.mul_(0.5)  # a "compression" of layer 0
        if step.index == 2:
            inputs_of_last.append(torch.cat(step.inputs))

    run_sequential(model, ids, on_layer, batch_size=3, progress=False)
    # the runner's layer-2 inputs are those of the model as modified, not of the original
    expected = _final_hidden(model, ids)[2]
    torch.testing.assert_close(inputs_of_last[0], expected, rtol=1e-5, atol=1e-5)


def test_hooks_see_every_calibration_token(tiny_model):
    model = tiny_model("qwen3")
    ids = torch.randint(0, 128, (3, 10))
    counts = []

    def on_layer(step):
        seen = []
        step.run({step.layer.mlp.up_proj: lambda m, args, out: seen.append(args[0].shape[:-1].numel())})
        counts.append(sum(seen))

    run_sequential(model, ids, on_layer, batch_size=2, progress=False)
    assert counts == [30, 30, 30]


def test_calibration_bytes_count_what_the_runner_holds(tiny_model):
    """The estimate that refuses a calibration too big for memory (before the text is even read) equals the bytes
    the runner holds at a layer: every window's hidden states in and out, the per-batch keyword tensors and the
    token ids (the Hessians the OBS passes hold at a layer on top: one per input, q/k/v and gate/up sharing one)."""
    from compress.hessian import HessianAccumulator, input_statistics
    from compress.sequential import calibration_bytes

    model = tiny_model("qwen3", head_dim=32)  # a head_dim of its own (4 heads x 32 beside hidden 64)

    batches = torch.randint(0, 100, (11, 24))  # 2 batches of 8, the last one short
    prefix, layers = decoder_layers(model)
    linears = {f"{prefix}.0.{n}": m for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    held, hessians = [], []

    def on_layer(step):
        kw = [t for kw in step.kwargs for v in kw.values()
              for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)]
        held.append(2 * sum(x.nbytes for x in step.inputs) + sum(t.nbytes for t in kw) + batches.nbytes)
        if step.index == 0:  # the accumulators the passes build there
            accs = input_statistics(step, {n.split(".0.", 1)[1]: m for n, m in linears.items()},
                                    lambda m: HessianAccumulator(m.in_features, "cpu"))
            hessians.append(sum(a.hessian.nbytes for a in {id(a): a for a in accs.values()}.values()))

    run_sequential(model, batches, on_layer, progress=False)
    assert set(held) == {calibration_bytes(model, 11, 24, {}, hessians=False)}
    assert len(hessians) == 1 and hessians[0] < sum(4 * m.in_features ** 2 for m in linears.values())
    assert calibration_bytes(model, 11, 24, linears, hessians=True) == held[0] + hessians[0]


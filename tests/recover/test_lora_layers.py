"""The sparsity-keeping LoRA layer: merging changes no output, pruned weights stay zero, packed layers stay packed
with the same structure; unpruned layers get plain PEFT LoRA."""
import pytest
import torch
from peft import LoraConfig
from torch import nn

from compress.prune.masks import nm_mask, unstructured_mask
from compress.prune.sparse_linear import SparseLinear
from compress.recover.lora import ADAPTER, SparsityKeepingLoraLinear, keep_mask


def pruned_linear(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    linear = nn.Linear(32, 24, bias=True)
    if kind == "dense":
        return linear
    mask = nm_mask(linear.weight.abs(), 2, 4) if kind == "nm" else unstructured_mask(linear.weight.abs(), 0.6)
    with torch.no_grad():
        linear.weight.mul_(mask)
    if kind == "dense_pruned":
        return linear
    return SparseLinear.from_linear(linear, mask, (2, 4) if kind == "nm" else None)


def wrapped(base: nn.Module) -> SparsityKeepingLoraLinear:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["x"])
    base.requires_grad_(False)  # frozen, as get_peft_model leaves it
    layer = SparsityKeepingLoraLinear(base, ADAPTER, config=config, r=4, lora_alpha=8)
    with torch.no_grad():  # PEFT initializes B to zero: make the update non-trivial
        layer.lora_B[ADAPTER].weight.normal_(0, 0.5)
    return layer


def dense_of(base: nn.Module) -> torch.Tensor:
    return base.dense_weight(torch.float32) if isinstance(base, SparseLinear) else base.weight.detach().clone()


@pytest.mark.parametrize("kind", ["nm", "bitmask", "dense_pruned", "dense"])
def test_merge_leaves_outputs_unchanged_and_keeps_the_zeros(kind):
    base = pruned_linear(kind)
    before = dense_of(base)
    layer = wrapped(base)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        plain = base(x)
        unmerged = layer(x)
        assert (unmerged - plain).abs().max() > 1e-2  # the adapter does something
        layer.merge()
        merged = layer(x)
        after_merge = dense_of(base)
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base(x), unmerged, rtol=1e-5, atol=1e-5)  # the base layer alone now does it
    if kind == "dense":
        assert layer.keep_mask is None  # plain PEFT LoRA: every weight may move
        assert (after_merge != before).float().mean() > 0.99
    else:
        zeros = before == 0
        assert zeros.float().mean() >= 0.5
        assert not after_merge[zeros].any()  # pruned weights stay exactly zero
        assert (after_merge[~zeros] != before[~zeros]).float().mean() > 0.99
    if kind in ("nm", "bitmask"):
        assert isinstance(layer.get_base_layer(), SparseLinear)
    with torch.no_grad():
        layer.unmerge()
        torch.testing.assert_close(dense_of(base), before, rtol=1e-5, atol=1e-6)


def test_a_few_exact_zeros_are_not_a_pruned_layer():
    """A trained layer may hold exact zeros by chance: below 1% it gets plain PEFT LoRA (every weight moves on merge,
    the adapter loads in plain PEFT); from 1% its zeros are kept."""
    base = pruned_linear("dense")
    with torch.no_grad():
        base.weight.view(-1)[:5] = 0.0                        # 5 of 768: 0.65%
    layer = wrapped(base)
    assert layer.keep_mask is None and layer.transformers_reads
    with torch.no_grad():
        layer.merge()
    assert (base.weight.view(-1)[:5] != 0).all()
    base = pruned_linear("dense")
    with torch.no_grad():
        base.weight.view(-1)[:8] = 0.0                        # 8 of 768: 1.04%
    layer = wrapped(base)
    assert layer.keep_mask is not None and not layer.transformers_reads
    with torch.no_grad():
        layer.merge()
    assert not base.weight.view(-1)[:8].any()
    base = pruned_linear("dense")  # marked by the prune pass: its zeros are kept however few
    with torch.no_grad():
        base.weight.view(-1)[:5] = 0.0
    base.compress_pruned = True
    layer = wrapped(base)
    with torch.no_grad():
        layer.merge()
    assert not base.weight.view(-1)[:5].any() and (base.weight.view(-1)[5:] != 0).all()


def test_nm_merge_keeps_the_packed_structure():
    base = pruned_linear("nm")
    indices = base.indices.clone()
    mask = keep_mask(base)
    assert torch.equal(mask, base.dense_weight() != 0)
    layer = wrapped(base)
    with torch.no_grad():
        layer.merge()
    assert torch.equal(base.indices, indices)
    assert base.values.shape == (24, 16)
    groups = (base.dense_weight() != 0).view(24, 8, 4).sum(-1)
    assert bool((groups <= 2).all())


def test_only_the_adapter_trains_and_gradients_respect_the_mask():
    base = pruned_linear("bitmask")
    layer = wrapped(base)
    layer(torch.randn(4, 32)).pow(2).sum().backward()
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    assert a.grad is not None and b.grad is not None
    assert all(t.grad is None for t in base.buffers())


@pytest.mark.parametrize("kind", ["nm", "bitmask", "dense_pruned"])
def test_calls_that_train_nothing_use_a_merged_copy_that_follows_the_adapter(kind):
    """Without gradients a merged copy of the layer computes the call (built once, packed like the base), the same
    numbers as the update built every call for training; a changed adapter (an optimizer step) rebuilds it."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 48, bias=True)
    mask = nm_mask(linear.weight.abs(), 2, 4) if kind == "nm" else unstructured_mask(linear.weight.abs(), 0.6)
    with torch.no_grad():
        linear.weight.mul_(mask)
    nm = (2, 4) if kind == "nm" else None
    base = linear if kind == "dense_pruned" else SparseLinear.from_linear(linear, mask, nm)
    layer = wrapped(base)
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for tokens in (1, 3, 20):
        x = torch.randn(2, tokens, 128)
        training = layer(x)  # adapters require grad: the per-call update, with its graph
        with torch.no_grad():
            packed = layer(x)
        assert training.requires_grad and not packed.requires_grad
        assert type(layer.__dict__["_merged_cache"][1]) is type(base)  # the merged copy ran
        torch.testing.assert_close(packed, training.detach(), rtol=1e-5, atol=1e-5)
        training.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # after the step: the new adapter, not the packed copy of the old one
            torch.testing.assert_close(layer(x), layer.base_layer(x) + _masked_update(layer, x), rtol=1e-5,
                                       atol=1e-5)
    layer.requires_grad_(False)  # frozen adapter, gradients on: no graph needed, the packed path too
    x = torch.randn(1, 1, 128)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + _masked_update(layer, x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.base_layer.bias.add_(1.0)  # the layer's own tensors changed in place: rebuilt too
        torch.testing.assert_close(layer(x), layer.base_layer(x) + _masked_update(layer, x), rtol=1e-5, atol=1e-5)
        layer.lora_B[ADAPTER].weight.data.mul_(2.0)  # .data bumps no version: forget_merged_copy says so
        layer.forget_merged_copy()
        torch.testing.assert_close(layer(x), layer.base_layer(x) + _masked_update(layer, x), rtol=1e-5, atol=1e-5)


def _masked_update(layer: SparsityKeepingLoraLinear, x: torch.Tensor) -> torch.Tensor:
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    return x @ ((b @ a) * layer.keep_mask * layer.scaling[ADAPTER]).T


@pytest.mark.parametrize("kind", ["nm", "dense_pruned", "dense"])
def test_activation_sparsity_reads_the_weight_an_unmerged_adapter_computes_with(kind):
    """`eval --activation-sparsity` / the pass weigh neurons by the down projection's columns: beside an unmerged
    adapter that is base + update (the wrapper's `weight` is the base layer's alone)."""
    from compress.prune.activation_sparsity import down_weight

    layer = wrapped(pruned_linear(kind))
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = layer(x) - layer.get_base_layer().bias
        torch.testing.assert_close(x @ down_weight(layer).t(), expected, rtol=1e-5, atol=1e-5)
        layer.merge()  # merged: the base layer holds the update; counted once
        torch.testing.assert_close(x @ down_weight(layer).t(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nm", "bitmask", "dense_pruned"])
def test_masked_update_forward_and_backward_match_a_float64_reference(kind):
    layer = wrapped(pruned_linear(kind)).train()
    x = torch.randn(2, 5, 32, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    a, b = (t.detach().double().requires_grad_() for t in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight))
    x64 = x.detach().double().requires_grad_()
    mask, s = layer.keep_mask.double(), layer.scaling[ADAPTER]
    ref = x64 @ dense_of(layer.get_base_layer()).double().T + layer.get_base_layer().bias.double() \
        + x64 @ ((b @ a) * mask * s).T
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for ours, theirs in ((x.grad, x64.grad), (layer.lora_A[ADAPTER].weight.grad, a.grad),
                         (layer.lora_B[ADAPTER].weight.grad, b.grad)):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)


def test_training_keeps_no_out_by_in_update_for_backward():
    # autograd kept (B A) * M and M as float, two [out, in] float32 matrices a layer, until backward (peak added
    # by recover on an 8-layer 0.12B float32 model: 2298 vs 1216 MB now); and the layer held its bool mask, a byte
    # per weight. What a forward saves now is x, A and B
    big = SparseLinear.from_weight(torch.randn(512, 256), torch.rand(512, 256) > 0.5, None)
    for layer in (wrapped(pruned_linear("bitmask")), wrapped(big)):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        x = torch.randn(3, layer.in_features, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer.train()(x).sum()
        update_shaped = (layer.out_features, layer.in_features)  # neither the update nor the mask
        assert not [t for t in saved if t.shape == update_shaped], [t.shape for t in saved]
        assert not [t for t in layer.buffers() if t.shape == update_shaped]  # nor a mask held between calls

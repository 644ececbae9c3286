"""Integer quantization math: codes and dequantization against a float64 reference, bit packing, QuantizedLinear's
exporter interface, GPTQ against round-to-nearest on real calibration activations, and 2:4 kept through GPTQ."""
from __future__ import annotations

import pytest
import torch

from compress.hessian import HessianAccumulator
from compress.prune.masks import nm_mask
from compress.quantize import QuantizedLinear
from compress.quantize.gptq import gptq_quantize
from compress.quantize.int_quant import expand_groups, pack_codes, quantize_rtn, unpack_codes


def reference_rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool):
    """Float64, one group at a time, written from the definitions (compressed-tensors' conventions)."""
    w = w.double()
    out = torch.empty_like(w)
    for g0 in range(0, w.shape[1], group):
        b = w[:, g0:g0 + group]
        if symmetric:
            scale = (b.abs().amax(1) / ((2**bits - 1) / 2)).to(torch.bfloat16).double()
            q = torch.round(b / scale[:, None]).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            out[:, g0:g0 + group] = q * scale[:, None]
        else:
            lo, hi = b.amin(1).clamp(max=0), b.amax(1).clamp(min=0)
            scale = ((hi - lo) / (2**bits - 1)).to(torch.bfloat16).double()
            zero = torch.round(-lo / scale).clamp(0, 2**bits - 1)
            q = (torch.round(b / scale[:, None]) + zero[:, None]).clamp(0, 2**bits - 1)
            out[:, g0:g0 + group] = (q - zero[:, None]) * scale[:, None]
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_matches_float64_reference(bits, symmetric):
    torch.manual_seed(0)
    w = torch.randn(24, 200) * torch.rand(24, 1) * 3  # 200 = 128 + a shorter last group of 72
    codes, scales, zeros = quantize_rtn(w, bits, 128, symmetric, torch.bfloat16)
    layer = QuantizedLinear.from_codes(codes, scales, zeros, bits=bits, group_size=128)
    ref = reference_rtn(w, bits, 128, symmetric)
    torch.testing.assert_close(layer.dequantized_weight().double(), ref, rtol=1e-6, atol=1e-6)
    # the interface the compressed-tensors exporter reads
    q = layer.int_weight()
    assert q.dtype == (torch.int16 if (bits == 8 and not symmetric) else torch.int8)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert lo <= int(q.min()) and int(q.max()) <= hi
    assert layer.scales().shape == (24, 2) and torch.equal(layer.scales(), scales.float())
    if symmetric:
        assert layer.zero_points() is None
        rebuilt = q.float() * expand_groups(layer.scales(), 128, 200)
    else:
        rebuilt = (q.float() - expand_groups(layer.zero_points().float(), 128, 200)) * expand_groups(layer.scales(), 128, 200)
    torch.testing.assert_close(rebuilt, layer.dequantized_weight(), rtol=0, atol=0)
    # within half a step of each group's scale (a little more at the clamped extreme: the scale is rounded to bf16)
    step = expand_groups(layer.scales(), 128, 200)
    assert bool(((layer.dequantized_weight() - w).abs() <= step * (0.5 + 2 ** (bits - 1) / 256)).all())
    x = torch.randn(3, 200)
    # the layer's product (C: per-group float32 sums, then scaled) against the float64 product, within float32
    # rounding of the terms' magnitudes (its summation order differs from torch's GEMM, so not to torch's bits)
    weight = layer.dequantized_weight().double()
    exact = x.double() @ weight.T
    assert bool(((layer(x).double() - exact).abs() <= (x.double().abs() @ weight.abs().T) * 2**-20).all())


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_packing_round_trip(bits, symmetric):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    codes = torch.randint(lo, hi + 1, (5, 33), dtype=torch.int16)  # odd width: padded nibble
    packed = pack_codes(codes, bits, symmetric)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 17 if bits == 4 else 33)
    assert torch.equal(unpack_codes(packed, 33, bits, symmetric), codes)


GPTQ_LAYERS = ("model.layers.2.mlp.down_proj", "model.layers.1.self_attn.o_proj")


@pytest.fixture(scope="module")
def calibration_inputs(reference_model, reference_tokenizer) -> dict[str, torch.Tensor]:
    """Inputs of two Linear layers of the reference model on 4 x 256 tokens of its calibration text."""
    from compress.models import BUILTIN_ROOT

    text = (BUILTIN_ROOT / "tiny" / "calibration.txt").read_text()[:20000]
    ids = reference_tokenizer(text, return_tensors="pt").input_ids[:, :1024]
    seen = {name: [] for name in GPTQ_LAYERS}
    handles = [reference_model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen[n].append(i[0]))
               for n in GPTQ_LAYERS]
    with torch.no_grad():
        reference_model(ids.view(4, 256))
    for h in handles:
        h.remove()
    return {n: torch.cat([s.reshape(-1, s.shape[-1]) for s in v]) for n, v in seen.items()}


@pytest.mark.parametrize("symmetric,act_order", [(True, False), (False, True)])
def test_gptq_beats_round_to_nearest_on_calibration_activations(reference_model, calibration_inputs, symmetric,
                                                                act_order):
    name = GPTQ_LAYERS[0]  # 704 inputs: five groups of 128 and one of 64
    x = calibration_inputs[name]
    w = reference_model.get_submodule(name).weight.detach()
    acc = HessianAccumulator(w.shape[1], "cpu")
    acc.add(x[: len(x) // 2])  # calibrate on one half, measure on the other too
    result = gptq_quantize(w, acc.hessian, 4, 128, symmetric, act_order=act_order, scale_dtype=torch.bfloat16)
    gptq = QuantizedLinear.from_codes(result.codes, result.scales, result.zeros, bits=4, group_size=128)
    rtn = QuantizedLinear.from_codes(*quantize_rtn(w, 4, 128, symmetric, torch.bfloat16), bits=4, group_size=128)
    for part in (x[: len(x) // 2], x[len(x) // 2:]):
        ref = part @ w.T
        err_gptq = (gptq(part) - ref).pow(2).mean()
        err_rtn = (rtn(part) - ref).pow(2).mean()
        assert err_gptq < 0.8 * err_rtn, (float(err_gptq), float(err_rtn))


def test_gptq_on_a_2of4_layer_keeps_the_pattern_and_beats_rtn(reference_model, calibration_inputs):
    name = GPTQ_LAYERS[1]
    x = calibration_inputs[name]
    w = reference_model.get_submodule(name).weight.detach()
    mask = nm_mask(w.abs(), 2, 4)
    acc = HessianAccumulator(w.shape[1], "cpu")
    acc.add(x)
    for symmetric in (True, False):
        r = gptq_quantize(w, acc.hessian, 4, 128, symmetric, mask=mask, scale_dtype=torch.bfloat16)
        layer = QuantizedLinear.from_codes(r.codes, r.scales, r.zeros, bits=4, group_size=128, mask=mask, nm=(2, 4))
        deq = layer.dequantized_weight()
        assert bool((deq[~mask] == 0).all()), "GPTQ's error feedback filled a pruned position"
        assert bool(((deq != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all())
        assert torch.equal(layer.sparsity_mask(), mask) and layer.sparsity_structure == (2, 4)
        zero_code = 0 if symmetric else expand_groups(layer.zero_points().long(), 128, w.shape[1])[~mask]
        assert bool((layer.int_weight().long()[~mask] == zero_code).all())
        rtn = QuantizedLinear.from_codes(*quantize_rtn(w, 4, 128, symmetric, torch.bfloat16, mask=mask), bits=4,
                                         group_size=128, mask=mask, nm=(2, 4))
        ref = x @ (w * mask).T
        assert (layer(x) - ref).pow(2).mean() < (rtn(x) - ref).pow(2).mean()
    # packed: kept codes only (2 of 4, two per byte) + 2-bit positions
    assert layer.weight_packed.shape == (w.shape[0], w.shape[1] // 4)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_rounds_inputs_dead_in_calibration_instead_of_zeroing_them(act_order):
    # the reference code zeroes the weights of inputs that were always zero in calibration: on a ReLU MLP whose
    # units fire on other text that was far worse than rounding to nearest (output MSE 1.3e-2 vs 4.3e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, [3, 40]] = 0
    acc = HessianAccumulator(64, "cpu")
    acc.add(x)
    w = torch.randn(16, 64, generator=g)
    result = gptq_quantize(w, acc.hessian, 4, 32, True, act_order=act_order)
    assert any("always zero" in n for n in result.notes)
    deq = (result.codes * expand_groups(result.scales, 32, 64)).float()
    step = expand_groups(result.scales, 32, 64).float()
    for col in (3, 40):  # rounded: within half a step of the original (zeroed, most were several steps away)
        assert ((deq[:, col] - w[:, col]).abs() <= step[:, col] / 2 + 1e-6).all(), col


@pytest.mark.parametrize("seed,dampening", [(55, 1e-10), (68, 1e-9)])
def test_gptq_act_order_factorizes_once_with_retries(seed, dampening):
    # near-singular Hessians that factorize unpermuted but not permuted in float32 (a second factorization without
    # retries returned None: TypeError); act_order must end like the plain order, with codes and a dampening used
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(8, 120, (1,), generator=g))
    x = torch.randn(n, 128, generator=g) * torch.exp(4 * torch.randn(128, generator=g))
    h = 2 / n * x.t() @ x
    w = torch.randn(16, 128, generator=g)
    result = gptq_quantize(w, h, 4, 32, act_order=True, dampening=dampening)
    assert result.fallback is None and result.codes.shape == w.shape
    assert result.dampening >= dampening
    deq = result.codes * expand_groups(result.scales, 32, 128)
    assert ((x @ (deq - w).T).pow(2).mean() / (x @ w.T).pow(2).mean()) < 0.1  # (0.012 and 0.029 measured)

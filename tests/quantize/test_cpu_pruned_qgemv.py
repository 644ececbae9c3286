"""Pruned-then-quantized layers on the CPU: a 2:4 layer's kept codes multiplied where their positions say
(kernels/csrc/qsparse.c), an unstructured one's dense codes (pruned ones at the code of zero) through qgemv.c, each
against the float64 product of the dequantized weight, at every x86 level this CPU runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress.kernels import quantized_linear_cpu as cpu
from compress.kernels.cpu_build import load_c_library
from compress.kernels.dispatch import forced_kernels
from compress.quantize import QuantizedLinear
from compress.quantize.int_quant import quantize_rtn

pytestmark = pytest.mark.skipif(load_c_library("qsparse") is None, reason="no C compiler: the torch path runs")


def pruned_layer(out_f, in_f, bits, group, symmetric, scale_dtype, nm: bool, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if nm:
        scores = torch.rand(out_f, in_f // 4, 4, generator=g)
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, -1).indices, True)
        mask = mask.view(out_f, in_f)
    else:
        mask = torch.rand(out_f, in_f, generator=g) < 0.5
    codes, scales, zeros = quantize_rtn(w * mask, bits, group, symmetric, scale_dtype)
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantizedLinear.from_codes(codes, scales, zeros, bits=bits, group_size=group, bias=b, mask=mask,
                                      nm=(2, 4) if nm else None, dtype=scale_dtype)


# (in, group): whole groups of 16-column steps take the AVX2 loop; 12 and 40 (not a multiple of 16) the plain one
SHAPES = [(256, 128), (64, 16), (200, 40), (48, 12), (96, 96)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_kept_codes_times_x_equals_the_dequantized_product(bits, symmetric, scale_dtype, cpu_level):
    for in_f, group in SHAPES:
        layer = pruned_layer(13, in_f, bits, group, symmetric, scale_dtype, nm=True, seed=in_f)
        reference = layer.dequantized_weight(torch.float64)
        for tokens in (1, 2, 3, 4, 7):
            x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens))
            assert cpu.cpu_nm24_qgemv_applies(layer.weight_packed, layer.indices, layer.weight_scale, 2, 4, in_f, x)
            y = cpu.cpu_nm24_qgemv(layer.weight_packed, layer.indices, layer.weight_scale, layer.weight_zero_point,
                                   bits, layer.group_size, x)
            want = x.double() @ reference.t()
            assert float((y.double() - want).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.parametrize("nm", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_pruned_quantized_layer_runs_in_c_and_matches_its_reference(nm, x_dtype, monkeypatch):
    layer = pruned_layer(24, 128, 4, 32, False, torch.float32, nm=nm, bias=True)
    x = torch.randn(3, 128).to(x_dtype)
    assert layer.runtime_path(3).endswith("multiplied in C" if not nm else "where their 2:4 positions say")
    with torch.no_grad():
        ours = layer(x)
        monkeypatch.setenv("COMPRESS_KERNELS", "torch")
        reference = F.linear(x, layer.dequantized_weight(x_dtype), layer.bias.to(x_dtype))
        assert torch.equal(layer(x), reference)  # forced to torch: the reference path itself
    exact = x.double() @ layer.dequantized_weight(torch.float64).t() + layer.bias.double()
    tol = 1e-5 if x_dtype == torch.float32 else 1e-2  # bf16: each output's rounding (the reference's too)
    for y in (ours, reference):
        assert y.dtype == x_dtype and float((y.double() - exact).abs().max() / exact.abs().max()) < tol


def test_an_unstructured_layer_with_codes_where_it_is_pruned_takes_the_reference_path(monkeypatch):
    """The C product reads every stored code: a layer whose pruned positions hold anything but the code of zero (a
    checkpoint not written by this library) must not run it."""
    layer = pruned_layer(8, 64, 8, 64, True, torch.float32, nm=False)
    pruned = (~layer.sparsity_mask()).nonzero()[0]
    layer.weight_packed[pruned[0], pruned[1]] ^= 1  # 8 bits: one code per byte
    monkeypatch.setattr(cpu, "cpu_qgemv", lambda *a, **k: pytest.fail("C product over a nonzero pruned code"))
    x = torch.randn(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_dequantizes_2of4_rows_in_c_bit_for_bit(dtype, monkeypatch, cpu_level):
    """Above the product's token count: blocks of rows dequantized in C (bit for bit the reference's weight), then
    torch's GEMM; before, every call built the float weight through full-size temporaries (2.5 s a 14336x4096 layer)."""
    layer = pruned_layer(300, 96, 4, 32, False, torch.float32, nm=True, bias=True)
    monkeypatch.setattr(cpu, "ROW_BLOCK", 128)  # 300 rows: two full blocks and a partial one
    buf = torch.empty(300, 96, dtype=dtype)
    cpu.load_c_library("qsparse", cpu._NM24_SIGNATURES).nm24_dequantize(
        layer.weight_packed.data_ptr(), layer.weight_packed.stride(0), layer.indices.data_ptr(),
        layer.indices.stride(0), layer.weight_scale.data_ptr(), 0, layer.weight_zero_point.data_ptr(), 4, 300, 96, 32,
        buf.data_ptr(), int(dtype == torch.bfloat16), 1)
    with forced_kernels("torch"):
        reference_weight = layer.dequantized_weight(dtype)
    assert torch.equal(buf, reference_weight)
    x = torch.randn(2, 20, 96).to(dtype)
    assert layer.runtime_path(40).startswith("dequantized in C a block of rows")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, reference_weight, layer.bias.to(dtype)))



def test_a_wrong_width_input_never_reaches_the_c_paths():
    layer = pruned_layer(16, 64, 4, 32, True, torch.float32, nm=True)
    for width in (32, 4096):
        for tokens in (1, 20):  # the product and the blocked dequantize
            with torch.no_grad(), pytest.raises(RuntimeError, match="shape|size"):
                layer(torch.randn(tokens, width))


def test_the_zero_code_check_is_made_again_after_the_codes_change():
    layer = pruned_layer(16, 64, 4, 32, True, torch.float32, nm=False)
    x = torch.randn(1, 64)
    with torch.no_grad():
        layer(x)  # checked: the pruned codes are the code of zero
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        state["weight_packed"] = torch.randint(0, 256, state["weight_packed"].shape, dtype=torch.uint8)
        layer.load_state_dict(state)
        torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().t())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_bf16_x_multiplies_the_kept_codes_bf16_weights(bits, symmetric, scale_dtype, cpu_level):
    """bf16 x on a CPU with AVX512-BF16 and VBMI (csrc/qgemv_bf16.c's 2:4 kernel): the reference's bf16 weight at the
    kept positions times x gathered to them, summed in float32; 4-row tiles and a remainder, 4-token tiles and a
    remainder, groups of 64 / 128, up to NM24_BF16_MAX_TOKENS."""
    if not cpu.cpu_nm24_qgemv_bf16_applies(256, 128, torch.bfloat16):
        pytest.skip("no AVX512-BF16 / VBMI at this build level: bf16 x takes qsparse.c (tested above)")
    for out_f, in_f, group in [(13, 256, 128), (6, 128, 64), (9, 192, 64)]:
        layer = pruned_layer(out_f, in_f, bits, group, symmetric, scale_dtype, nm=True, seed=in_f + bits)
        with forced_kernels("torch"):
            w = layer.dequantized_weight(torch.bfloat16).double()
        assert cpu.nm24_max_tokens(torch.bfloat16, in_f, group) == cpu.NM24_BF16_MAX_TOKENS
        for tokens in (1, 3, 4, 6, 9, cpu.NM24_BF16_MAX_TOKENS):
            x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
            packed = (layer.weight_packed, layer.indices, layer.weight_scale)
            assert cpu.cpu_nm24_qgemv_applies(*packed, 2, 4, in_f, x, group=group)
            zero = layer.weight_zero_point
            if zero is not None:  # stored column-major: the wrapper's contiguous copy must outlive the call
                zero = zero.t().contiguous().t()
            y = cpu.cpu_nm24_qgemv(*packed, zero, bits, group, x)
            want = x.double() @ w.t()
            assert float((y.double() - want).abs().max() / want.abs().max()) < 2e-6, (out_f, tokens)
        # prefill's blocks: the same bf16 weight written dense, bit for bit (nm24_dequantize_bf16)
        buf = torch.empty(out_f, in_f, dtype=torch.bfloat16)
        zero = layer.weight_zero_point
        args = (layer.weight_packed.data_ptr(), layer.weight_packed.stride(0), layer.indices.data_ptr(),
                layer.indices.stride(0), layer.weight_scale.data_ptr(), int(scale_dtype == torch.bfloat16),
                None if zero is None else zero.data_ptr(), bits, out_f, in_f, group, buf.data_ptr(), 1)
        assert cpu._bf16_library().nm24_dequantize_bf16(*args)
        assert torch.equal(buf.view(torch.int16), w.to(torch.bfloat16).view(torch.int16))
        swapped = layer.indices.clone()
        swapped[-1, -1] = ((swapped[-1, -1] & 3) << 2) | ((swapped[-1, -1] >> 2) & 3) | (swapped[-1, -1] & 0xF0)
        assert not cpu._bf16_library().nm24_dequantize_bf16(*args[:2], swapped.data_ptr(), *args[3:])
        # ... and the layer then decodes those blocks with qsparse.c's loop: the product of what the positions say
        odd = pruned_layer(out_f, in_f, bits, group, symmetric, scale_dtype, nm=True, seed=in_f + bits)
        odd.indices.copy_(swapped)
        with forced_kernels("torch"):
            odd_w = odd.dequantized_weight(torch.bfloat16).double()
        ys = torch.randn(18, in_f, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        with torch.no_grad():
            got, exact = odd(ys).double(), ys.double() @ odd_w.t()
        assert float((got - exact).abs().max() / exact.abs().max()) < 2 ** -7
        # 18 tokens: the blocked path, through the layer (bf16 GEMM and output: within bf16 of the exact product)
        xs = torch.randn(2, 9, in_f, generator=torch.Generator().manual_seed(in_f)).to(torch.bfloat16)
        with torch.no_grad():
            got, exact = layer(xs).double(), xs.double() @ w.t()
        assert float((got - exact).abs().max() / exact.abs().max()) < 2 ** -7
    assert not cpu.cpu_nm24_qgemv_bf16_applies(96, 32, torch.bfloat16)  # groups of 32 keep qsparse.c's loop

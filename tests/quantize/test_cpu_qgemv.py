"""QuantizedLinear's decoding product on the CPU (kernels/csrc/qgemv.c): the packed codes multiplied as they are,
against the float64 product of the dequantized weight, on the AVX-512 path (whole groups of 32 / 16 columns) and the
plain C path (other groups, short last groups), and in the layer against its dequantize-then-matmul path."""
from __future__ import annotations

import pytest
import torch

from compress.kernels.cpu_build import load_c_library
from compress.kernels.dispatch import forced_kernels
from compress.kernels.quantized_linear_cpu import (MAX_TOKENS, cpu_dequantize, cpu_qgemv, cpu_qgemv_applies,
                                                   cpu_qgemv_bf16_applies, max_tokens)
from compress.quantize import QuantizedLinear
from compress.quantize.int_quant import quantize_rtn

pytestmark = pytest.mark.skipif(load_c_library("qgemv") is None, reason="no C compiler: the torch path runs")


def layer(out_f, in_f, bits, group, symmetric, scale_dtype, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, 1, generator=g) + 0.5)
    codes, scales, zeros = quantize_rtn(w, bits, group, symmetric, scale_dtype)
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantizedLinear.from_codes(codes, scales, zeros, bits=bits, group_size=group, bias=b, dtype=scale_dtype)


# (out, in, group): 128 / 64 / 48 (8 bits) whole groups take the AVX-512 path where the CPU has it; 48 (4 bits),
# 100 and a short last group (200 = 3 x 64 + 8) the plain C loops
SHAPES = [(37, 256, 128), (20, 192, 64), (9, 96, 48), (11, 100, 100), (13, 200, 64)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f,group", SHAPES)
def test_codes_times_x_equals_the_dequantized_product(bits, symmetric, scale_dtype, out_f, in_f, group, cpu_level):
    q = layer(out_f, in_f, bits, group, symmetric, scale_dtype, seed=in_f + bits)
    with forced_kernels("torch"):  # the torch reference's weight, not the C dequantize (checked separately below)
        w = q.dequantized_weight(torch.float32).double()  # exact: codes times bf16/fp32 scales
    for tokens in (1, 3, 7):  # 7 = 4 + 2 + 1 token blocks
        x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens))
        assert cpu_qgemv_applies(q.weight_packed, q.weight_scale, bits, in_f, q.group_size, x)
        got = cpu_qgemv(q.weight_packed, q.weight_scale, q.weight_zero_point, bits, q.group_size, x)
        want = x.double() @ w.t()
        assert got.dtype == torch.float32 and got.shape == (tokens, out_f)
        assert float((got.double() - want).abs().max() / want.abs().max()) < 2e-6


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_bf16_x_is_multiplied_by_the_reference_bf16_weight(bits, symmetric, scale_dtype, cpu_level):
    """bf16 x on a CPU with AVX512-BF16 (csrc/qgemv_bf16.c): the torch reference's bf16 weight, bf16((u - z) * s),
    times x, summed in float32, for every tile the kernel runs (4 rows x t up to 4 tokens; 3 x 8 tiles and one
    3 x (t % 8) above; the last n % 4 / n % 3 rows one at a time), groups of 32 / 64 / 128, up to MAX_TOKENS."""
    if not cpu_qgemv_bf16_applies(256, 128, torch.bfloat16):
        pytest.skip("no AVX512-BF16 at this build level: bf16 x takes qgemv.c (tested above)")
    for out_f, in_f, group in [(37, 256, 128), (22, 192, 64), (7, 96, 32)]:
        q = layer(out_f, in_f, bits, group, symmetric, scale_dtype, seed=out_f + bits)
        with forced_kernels("torch"):
            w = q.dequantized_weight(torch.bfloat16).double()
        assert max_tokens(torch.bfloat16, in_f, group) == MAX_TOKENS
        for tokens in (1, 2, 3, 4, 5, 8, 11, MAX_TOKENS):
            x = torch.randn(tokens, 2 * in_f, generator=torch.Generator().manual_seed(tokens))[:, ::2]
            x = x.to(torch.bfloat16)  # a strided view: the wrapper hands the kernel contiguous rows
            assert cpu_qgemv_applies(q.weight_packed, q.weight_scale, bits, in_f, group, x)
            got = cpu_qgemv(q.weight_packed, q.weight_scale, q.weight_zero_point, bits, group, x)
            want = x.double() @ w.t()
            assert got.dtype == torch.float32 and got.shape == (tokens, out_f)
            assert float((got.double() - want).abs().max() / want.abs().max()) < 2e-6, (out_f, tokens)
    # a group that is not a multiple of 32 columns keeps qgemv.c's loop and its token limit
    assert not cpu_qgemv_bf16_applies(96, 48, torch.bfloat16)
    assert max_tokens(torch.bfloat16, 96, 48) < MAX_TOKENS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_decodes_through_the_kernel_and_matches_its_torch_path(monkeypatch, dtype):
    monkeypatch.delenv("COMPRESS_KERNELS", raising=False)
    q = layer(48, 256, 4, 128, True, dtype, bias=True)
    x = torch.randn(2, 3, 256).to(dtype)  # 6 tokens: within MAX_TOKENS
    most = max_tokens(dtype, 256, 128)  # bf16 without AVX512-BF16: fewer (AMX's GEMM wins sooner)
    assert q.runtime_path(most) == "int4 codes multiplied in C"
    assert q.runtime_path(most + 1) == "dequantized in C a block of rows at a time, then torch's matmul"
    with torch.no_grad():
        fast = q(x)
        monkeypatch.setenv("COMPRESS_KERNELS", "torch")
        assert q.runtime_path(1) == "dequantized, then a dense matmul"
        slow = q(x)
        exact = x.double() @ q.dequantized_weight(torch.float32).double().t() + q.bias.double()
    assert fast.dtype == dtype and fast.shape == (*x.shape[:-1], 48)
    # relative to the largest output: bf16 rounds the result (ours, once) and the weight, sums and bias (torch's)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8
    for y in (fast, slow):
        assert float((y.double() - exact).abs().max() / exact.abs().max()) < tol


def test_inputs_the_kernel_cannot_take_go_to_the_torch_path():
    """A row of another width (torch raises), no tokens, float64 (computed in float64 there)."""
    q = layer(8, 256, 4, 128, True, torch.float32)
    for x in (torch.randn(1, 128), torch.randn(1, 512), torch.randn(0, 256), torch.randn(2, 256, dtype=torch.float64)):
        assert not cpu_qgemv_applies(q.weight_packed, q.weight_scale, 4, 256, 128, x)
    with pytest.raises(RuntimeError):
        q(torch.randn(1, 128))
    assert q(torch.randn(0, 256)).shape == (0, 8)


def test_gradients_and_prefill_take_the_torch_path():
    q = layer(16, 128, 4, 64, True, torch.float32)
    x = torch.randn(2, 128, requires_grad=True)
    assert not cpu_qgemv_applies(q.weight_packed, q.weight_scale, 4, 128, 64, x)
    y = q(x)
    y.sum().backward()  # through dequantize-then-matmul
    torch.testing.assert_close(x.grad, q.dequantized_weight().sum(0).expand(2, -1))
    big = torch.randn(MAX_TOKENS + 1, 128)
    assert not cpu_qgemv_applies(q.weight_packed, q.weight_scale, 4, 128, 64, big)


@pytest.mark.parametrize("tokens", [1, 40, 600])  # the product, the blocked dequantize, the whole dequantize
def test_trained_scales_get_their_gradient_on_every_path(tokens):
    """A user training the scales: the C paths read them as plain memory and dropped their gradient (and with x not
    requiring one, the output had no graph at all); they now take the torch path, as with COMPRESS_CPU_KERNELS=off."""
    q = layer(16, 128, 4, 64, False, torch.float32, bias=True)
    q.weight_scale.requires_grad_(True)
    x = torch.randn(tokens, 128)
    q(x).sum().backward()
    got = q.weight_scale.grad.clone()
    q.weight_scale.grad = None
    with forced_kernels("torch"):
        q(x).sum().backward()
    torch.testing.assert_close(got, q.weight_scale.grad)
    with torch.no_grad():  # no gradient asked: the C paths as before
        assert q._path(x[:1]) == "product"


def test_unstructured_pruned_layer_runs_under_inference_mode():
    """Loaded under torch.inference_mode, a bitmask layer's cache key read `_version`, which inference tensors do
    not have: every forward raised."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 128, generator=g)
    codes, scales, zeros = quantize_rtn(w, 4, 64, False, torch.float32)
    mask = torch.rand(16, 128, generator=g) > 0.5
    with torch.inference_mode():
        q = QuantizedLinear.from_codes(codes, scales, zeros, bits=4, group_size=64, mask=mask)
        x = torch.randn(2, 128)
        got = q(x)
    with forced_kernels("torch"):
        torch.testing.assert_close(got, q(x))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# whole groups take the vector loops (bf16 on AVX512-BF16: straight from the codes); 200 / 64 and 99 (a padded nibble)
# the plain ones
@pytest.mark.parametrize("out_f,in_f,group", [(37, 256, 128), (6, 160, 32), (13, 200, 64), (5, 99, 32)])
def test_dequantize_in_c_is_the_torch_reference_bit_for_bit(bits, symmetric, dtype, out_f, in_f, group, cpu_level):
    """What prefill-sized inputs multiply (and `dequantized_weight()` returns): one C pass, identical to the torch
    reference's temporaries, float32 and bf16 (rounded to nearest even like torch's cast)."""
    q = layer(out_f, in_f, bits, group, symmetric, dtype, seed=out_f)
    fast = cpu_dequantize(q.weight_packed, q.weight_scale, q.weight_zero_point, bits, q.group_size, in_f, dtype)
    with forced_kernels("torch"):
        reference = q.dequantized_weight(dtype)
    assert fast is not None and fast.dtype == dtype
    assert torch.equal(fast, reference)
    assert torch.equal(q.dequantized_weight(dtype), reference)  # the layer's own call takes the C pass


def test_inspect_names_the_path_per_dtype():
    from compress.prune.runtime import runtime_plan

    plan = runtime_plan(torch.nn.ModuleDict({"a": QuantizedLinear(256, 8, dtype=torch.bfloat16),
                                             "b": QuantizedLinear(256, 8, dtype=torch.float32),
                                             "c": QuantizedLinear(99, 8, bits=4, group_size=33)}))
    assert plan["a"].startswith(f"int4 codes multiplied in C at <= {max_tokens(torch.bfloat16, 256, 128)} tokens")
    assert plan["b"].startswith(f"int4 codes multiplied in C at <= {MAX_TOKENS} tokens")
    assert plan["c"].startswith("int4 codes dequantized in C")  # an odd row: no C product, the row blocks run
    with forced_kernels("torch"):
        assert runtime_plan(torch.nn.ModuleDict({"b": QuantizedLinear(256, 8)}))["b"].endswith("(torch)")
    fp16 = runtime_plan(torch.nn.ModuleDict({"d": QuantizedLinear(256, 8, dtype=torch.float16)}))["d"]
    assert fp16.endswith("(torch)")  # float16 scales: forward stays in torch, and inspect says so


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_prefill_dequantizes_row_blocks_into_one_buffer(dtype, symmetric, monkeypatch):
    """Above MAX_TOKENS: ROW_BLOCK rows at a time dequantized and multiplied, the same values as dequantizing the
    whole weight then one matmul (float32: bit for bit), 300 rows in blocks of 128, a bias, 3-d input."""
    from compress.kernels import quantized_linear_cpu as qc

    monkeypatch.setattr(qc, "ROW_BLOCK", 128)  # 300 rows: two full blocks and a partial one
    q = layer(300, 256, 4, 64, symmetric, dtype, seed=3, bias=True)
    x = torch.randn(2, MAX_TOKENS, 256).to(dtype)  # 32 tokens
    with torch.no_grad():
        got = q(x)
        with forced_kernels("torch"):
            want = torch.nn.functional.linear(x, q.dequantized_weight(dtype), q.bias.to(dtype))
    assert got.shape == (2, MAX_TOKENS, 300) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:  # bf16 GEMMs round by their blocking (and F.linear fuses the bias): both within bf16 of the exact product
        exact = (x.double() @ q.dequantized_weight(torch.float32).double().t() + q.bias.double()).detach()
        for y in (got, want):
            assert float((y.double() - exact).abs().max() / exact.abs().max()) < 2 ** -7

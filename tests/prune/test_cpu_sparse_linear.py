"""The packed runtime's C kernels on the CPU (kernels/csrc/sparse_linear.c): the product over the packed storage for
few tokens and the blocked decode + GEMM above, against a float64 reference, at every x86 level this CPU runs."""
import itertools

import pytest
import torch

from compress.kernels import sparse_linear_cpu as cpu
from compress.kernels.sparse_bitmask import bitmask_decode_reference, bitmask_linear
from compress.kernels.sparse_nm import index_bits, nm_decode_reference, nm_linear
from compress.prune import SparseLinear
from compress.prune.packing import pack_bitmask, pack_nm

pytestmark = pytest.mark.skipif(cpu._library() is None, reason="no C compiler")

NM = [(2, 4), (1, 4), (4, 8), (3, 8), (1, 2), (2, 8)]  # 3:8 / 2:8 / 4:8: 3-bit fields that straddle bytes


def nm_mask(rows, cols, n, m, gen):
    scores = torch.rand(rows, cols // m, m, generator=gen)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(n, -1).indices, True)
    return keep.view(rows, cols)


def reference(x, weight64, bias):
    out = x.double() @ weight64.t()
    return out if bias is None else out + bias.double()


def assert_close_to(y, ref, x_dtype):
    scale = ref.abs().max().clamp_min(1e-30)
    tol = 1e-5 if x_dtype == torch.float32 else 2e-2  # bf16/fp16 x: the output's rounding
    assert y.dtype == x_dtype
    assert float((y.double() - ref).abs().max() / scale) < tol


@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 9, 40])  # 1-8: the product (blocks of 4/2/1); 9, 40: blocked
# (cols 120: 2:4 at one token runs four 16-column steps at a time, then three, then a plain tail of 8)
def test_nm_product_and_blocked_path(tokens, cpu_level):
    gen = torch.Generator().manual_seed(tokens)
    for (n, m), cols, value_dtype in itertools.product(NM, [16, 36, 72, 120, 200], [torch.float32, torch.bfloat16]):
        if cols % m:
            continue
        rows = 13
        weight = torch.randn(rows, cols, generator=gen).to(value_dtype)
        values, indices = pack_nm(weight, nm_mask(rows, cols, n, m, gen), n, m)
        bias = torch.randn(rows, generator=gen)
        x = torch.randn(2, tokens, cols, generator=gen) if tokens == 40 else torch.randn(tokens, cols, generator=gen)
        assert cpu.cpu_sparse_applies(x, cols, values, indices)
        y = cpu.nm_linear_cpu(x, values, indices, n, m, cols, bias)
        assert y.shape == (*x.shape[:-1], rows)
        assert_close_to(y, reference(x, nm_decode_reference(values, indices, n, m, cols, torch.float64), bias),
                        torch.float32)


@pytest.mark.parametrize("tokens", [1, 2, 4, 7, 9])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.95, 1.0])
def test_bitmask_product_and_blocked_path(tokens, density, cpu_level):
    gen = torch.Generator().manual_seed(tokens)
    for cols, value_dtype in itertools.product([8, 37, 64, 203], [torch.float32, torch.bfloat16]):
        rows = 11
        weight = torch.randn(rows, cols, generator=gen).to(value_dtype)
        mask = torch.rand(rows, cols, generator=gen) < density
        mask[-1] = False  # an empty last row: the rows before it read up to the buffer's very end
        mask[0, :3] = True
        values, bitmask, offsets = pack_bitmask(weight, mask)
        values = values.clone()  # no slack after the values in their storage
        x = torch.randn(tokens, cols, generator=gen)
        y = cpu.bitmask_linear_cpu(x, values, bitmask, offsets, cols)
        assert_close_to(y, reference(x, bitmask_decode_reference(values, bitmask, cols, torch.float64), None),
                        torch.float32)


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_blocked_decode_is_the_reference_weight_bit_for_bit(value_dtype, cpu_level):
    lib, gen = cpu._library(), torch.Generator().manual_seed(0)
    bits_view = torch.int32 if value_dtype == torch.float32 else torch.int16
    for (n, m), cols in itertools.product(NM, [8, 36, 72, 520]):
        if cols % m:
            continue
        weight = torch.randn(9, cols, generator=gen).to(value_dtype)
        values, indices = pack_nm(weight, nm_mask(9, cols, n, m, gen), n, m)
        out = torch.empty(9, cols, dtype=value_dtype)
        lib.nm_decode(values.data_ptr(), values.element_size(), indices.data_ptr(), indices.shape[1], n, m,
                      index_bits(m), 9, cols, out.data_ptr(), 1)
        assert torch.equal(out.view(bits_view), nm_decode_reference(values, indices, n, m, cols).view(bits_view))
    for cols, density in itertools.product([8, 37, 520], [0.0, 0.3, 1.0]):
        weight = torch.randn(9, cols, generator=gen).to(value_dtype)
        values, bitmask, offsets = pack_bitmask(weight, torch.rand(9, cols, generator=gen) < density)
        out = torch.empty(9, cols, dtype=value_dtype)
        lib.bitmask_decode(values.data_ptr(), values.element_size(), values.numel(), bitmask.data_ptr(),
                           bitmask.shape[1], offsets.data_ptr(), 9, cols, out.data_ptr(), 1)
        assert torch.equal(out.view(bits_view), bitmask_decode_reference(values, bitmask, cols).view(bits_view))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["nm", "bitmask"])
def test_sparse_linear_packed_runtime_equals_dense_runtime(fmt, x_dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=True)
    scores = lin.weight.abs()
    if fmt == "nm":
        keep = torch.zeros(40, 24, 4, dtype=torch.bool).scatter_(-1, scores.view(40, 24, 4).topk(2, -1).indices, True)
        layer = SparseLinear.from_linear(lin, keep.view(40, 96), (2, 4))
    else:
        layer = SparseLinear.from_linear(lin, scores > scores.median(), None)
    for tokens in (1, 6, 33):
        x = torch.randn(tokens, 96).to(x_dtype)
        with torch.no_grad():
            packed = layer(x)
            layer.set_runtime("dense")
            dense = layer(x)
            layer.set_runtime("packed")
        assert packed.dtype == dense.dtype == x_dtype
        tol = 1e-5 if x_dtype == torch.float32 else 2e-2
        torch.testing.assert_close(packed.float(), dense.float(), rtol=tol, atol=tol)


def test_gradients_take_the_torch_path(monkeypatch):
    """Training through a packed layer (recover's LoRA beside it) needs autograd: the C paths never run there."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 16, generator=gen)
    values, indices = pack_nm(weight, nm_mask(8, 16, 2, 4, gen), 2, 4)
    x = torch.randn(2, 16, generator=gen, requires_grad=True)
    monkeypatch.setattr(cpu, "nm_linear_cpu", lambda *a, **k: pytest.fail("C path with a gradient"))
    nm_linear(x, values, indices, 2, 4, 16).sum().backward()
    torch.testing.assert_close(x.grad, nm_decode_reference(values, indices, 2, 4, 16).sum(0).expand(2, 16))


def test_kernels_torch_setting_runs_the_reference(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 16, generator=gen)
    values, bitmask, offsets = pack_bitmask(weight, torch.rand(8, 16, generator=gen) < 0.5)
    monkeypatch.setenv("COMPRESS_KERNELS", "torch")
    monkeypatch.setattr(cpu, "bitmask_linear_cpu", lambda *a, **k: pytest.fail("C path under COMPRESS_KERNELS=torch"))
    x = torch.randn(1, 16, generator=gen)
    torch.testing.assert_close(bitmask_linear(x, values, bitmask, offsets, 16),
                               x @ bitmask_decode_reference(values, bitmask, 16).t())


def test_a_trained_bias_gets_its_gradient_through_the_c_paths():
    """Grad mode with x constant (e.g. a pruned layer's bias under recover): the C paths run, the bias still learns."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(8, 16, generator=gen)
    values, indices = pack_nm(weight, nm_mask(8, 16, 2, 4, gen), 2, 4)
    for tokens in (1, 20):  # the product and the blocked path
        bias = torch.randn(8, generator=gen, requires_grad=True)
        x = torch.randn(tokens, 16, generator=gen)
        y = nm_linear(x, values, indices, 2, 4, 16, bias)
        (y * torch.arange(8.0)).sum().backward()
        torch.testing.assert_close(bias.grad, torch.arange(8.0) * tokens)
        torch.testing.assert_close(y, x @ nm_decode_reference(values, indices, 2, 4, 16).t() + bias)


@pytest.mark.parametrize("fmt", ["nm", "bitmask"])
def test_a_wrong_width_input_is_refused_as_f_linear_refuses_it(fmt):
    """The kernels step through x by the layer's width: a wider or narrower x must not reach them (it read past x,
    or used part of it: an audit's find); the reference raises torch's shape error."""
    lin = torch.nn.Linear(64, 16)
    keep = torch.zeros(16, 16, 4, dtype=torch.bool)
    keep[..., :2] = True
    layer = SparseLinear.from_linear(lin, keep.view(16, 64), (2, 4) if fmt == "nm" else None)
    for width in (32, 63, 65, 4096):
        with torch.no_grad(), pytest.raises(RuntimeError, match="shape|size"):
            layer(torch.randn(1, width))


@pytest.mark.parametrize("tokens", [1, 3, 4, 6, 9, 16])  # tiles of 4 tokens and a remainder of 1-3
def test_bf16_products_sum_the_kept_products_in_float32(tokens, cpu_level):
    """bf16 values and x on a CPU with AVX512-BF16 + VBMI2 (csrc/sparse_bf16.c): 2:4 x gathered by its positions, the
    bitmask's values expanded to their lanes; each against the float64 product of the reference weight, float32
    output before its rounding to bf16, rows in tiles of 4 and a remainder, and through the layer's call."""
    if cpu._bf16_library() is None:
        pytest.skip("no AVX512-BF16 / VBMI2 at this build level: bf16 takes sparse_linear.c (tested above)")
    lib, gen = cpu._bf16_library(), torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 2 * 224, generator=gen).to(torch.bfloat16)[:, ::2].contiguous()
    for rows, cols in [(13, 64), (8, 128), (6, 192)]:
        weight = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
        xc = x[:, :cols].contiguous()
        values, indices = pack_nm(weight, nm_mask(rows, cols, 2, 4, gen), 2, 4)
        out = torch.empty(tokens, rows)
        assert cpu.cpu_sparse_bf16_available("nm", 2, 4, cols)
        lib.nm24_linear_bf16(values.data_ptr(), values.stride(0), indices.data_ptr(), indices.stride(0), rows, cols,
                             xc.data_ptr(), xc.stride(0), tokens, out.data_ptr(), out.stride(0), 1)
        want = reference(xc, nm_decode_reference(values, indices, 2, 4, cols, torch.float64), None)
        assert float((out.double() - want).abs().max() / want.abs().max()) < 2e-6
        assert torch.equal(cpu.nm_linear_cpu(xc, values, indices, 2, 4, cols), out.to(torch.bfloat16))
    for (rows, cols), density in itertools.product([(11, 32), (5, 96), (9, 224)], [0.0, 0.1, 0.5, 1.0]):
        weight = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
        mask = torch.rand(rows, cols, generator=gen) < density
        mask[-1] = False  # an empty last row: the rows before it read up to the values' very end
        mask[0, :3] = True
        values, bitmask, offsets = pack_bitmask(weight, mask)
        values, offsets = values.clone(), offsets.to(torch.int64)  # no slack after the values in their storage
        xc, out = x[:, :cols].contiguous(), torch.empty(tokens, rows)
        lib.bitmask_linear_bf16(values.data_ptr(), bitmask.data_ptr(), bitmask.stride(0), offsets.data_ptr(), rows,
                                cols, xc.data_ptr(), xc.stride(0), tokens, out.data_ptr(), out.stride(0), 1)
        want = reference(xc, bitmask_decode_reference(values, bitmask, cols, torch.float64), None)
        assert float((out.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)) < 2e-6
        assert torch.equal(cpu.bitmask_linear_cpu(xc, values, bitmask, offsets, cols), out.to(torch.bfloat16))
    # past BF16_MAX_TOKENS: blocks of rows decoded for torch's bf16 GEMM, through the layer's call
    for rows, cols in [(13, 64), (6, 192)]:
        weight = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
        values, indices = pack_nm(weight, nm_mask(rows, cols, 2, 4, gen), 2, 4)
        xs = torch.randn(2, cpu.BF16_MAX_TOKENS // 2 + 1, cols, generator=gen).to(torch.bfloat16)
        want = reference(xs, nm_decode_reference(values, indices, 2, 4, cols, torch.float64), None)
        assert_close_to(cpu.nm_linear_cpu(xs, values, indices, 2, 4, cols), want, torch.bfloat16)
        values, bitmask, offsets = pack_bitmask(weight, torch.rand(rows, cols, generator=gen) < 0.4)
        want = reference(xs, bitmask_decode_reference(values, bitmask, cols, torch.float64), None)
        assert_close_to(cpu.bitmask_linear_cpu(xs, values, bitmask, offsets, cols), want, torch.bfloat16)
    # what inspect says follows the same limit (it said 8 for bf16 layers that run the product to 16)
    lin = torch.nn.Linear(128, 8, bias=False, dtype=torch.bfloat16)
    layer = SparseLinear.from_linear(lin, nm_mask(8, 128, 2, 4, gen), (2, 4))
    assert layer.runtime_path(cpu.BF16_MAX_TOKENS).startswith(
        f"packed: C product over the packed values at <= {cpu.BF16_MAX_TOKENS} tokens")
    assert layer.runtime_path(cpu.BF16_MAX_TOKENS + 1) == "packed: blocks of rows decoded for torch's GEMM"
    # widths that are not whole steps, and float32 x, keep sparse_linear.c
    assert not cpu.cpu_sparse_bf16_available("nm", 2, 4, 96) and not cpu.cpu_sparse_bf16_available("nm", 1, 4, 128)
    assert not cpu.cpu_sparse_bf16_available("bitmask", 0, 0, 40)

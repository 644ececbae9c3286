"""The N:M sparse linear kernel against a float64 dense reference; the Triton kernel runs under TRITON_INTERPRET=1."""
import pytest
import torch

from compress.kernels import sparse_nm
from compress.prune.masks import nm_mask
from compress.prune.packing import pack_nm

TRITON_KERNEL = sparse_nm._nm_linear_kernel  # checked by the triton_kernels fixture (tests/kernels/conftest.py)


def packed_case(rows, cols, n, m, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mask = nm_mask(torch.rand(rows, cols, generator=g), n, m)
    values, indices = pack_nm(w.to(dtype), mask, n, m)
    return (w.to(dtype).float() * mask).double(), values, indices


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 2), (3, 8)])
def test_decode_reference_is_exact(n, m):
    dense, values, indices = packed_case(12, 48, n, m)
    assert indices.dtype == torch.uint8
    assert indices.shape[1] == -(-48 * n // m * sparse_nm.index_bits(m) // 8)
    decoded = sparse_nm.nm_decode_reference(values, indices, n, m, 48)
    assert torch.equal(decoded.double(), dense)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 2), (3, 8), (8, 16), (5, 32)])
def test_keep_mask_is_the_packed_positions(n, m):
    g = torch.Generator().manual_seed(1)
    mask = nm_mask(torch.rand(12, 96, generator=g), n, m)
    _, indices = pack_nm(torch.randn(12, 96, generator=g), mask, n, m)
    assert torch.equal(sparse_nm.nm_keep_mask(indices, n, m, 96), mask)


def test_two_of_four_packs_two_bits_per_kept_value():
    _, values, indices = packed_case(8, 64, 2, 4)
    assert values.shape == (8, 32) and indices.shape == (8, 8)  # 32 kept x 2 bits = 8 bytes per row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_linear_matches_float64(dtype):
    dense, values, indices = packed_case(20, 64, 2, 4, dtype=dtype)
    x = torch.randn(3, 5, 64)
    bias = torch.randn(20)
    y = sparse_nm.nm_linear(x, values, indices, 2, 4, 64, bias)
    ref = x.double() @ dense.t() + bias.double()
    assert y.shape == (3, 5, 20)
    assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-5


@pytest.mark.parametrize("n,m,rows,cols,tokens", [(2, 4, 24, 64, 5), (4, 8, 40, 96, 17), (3, 8, 9, 40, 1)])
def test_triton_kernel_matches_reference(triton_kernels, n, m, rows, cols, tokens):
    dev = triton_kernels
    dense, values, indices = packed_case(rows, cols, n, m, seed=rows)
    x = torch.randn(tokens, cols)
    bias = torch.randn(rows)
    y = sparse_nm.nm_linear(x.to(dev), values.to(dev), indices.to(dev), n, m, cols, bias.to(dev)).cpu()
    ref = x.double() @ dense.t() + bias.double()
    assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-5
    y_nobias = sparse_nm.nm_linear(x.to(dev), values.to(dev), indices.to(dev), n, m, cols).cpu()
    assert (y_nobias.double() - (ref - bias.double())).abs().max() / ref.abs().max() < 1e-5


def test_dispatch_forced_torch_runs_reference(monkeypatch):
    monkeypatch.setenv("COMPRESS_KERNELS", "torch")
    dense, values, indices = packed_case(8, 16, 2, 4)
    x = torch.randn(2, 16)
    assert torch.allclose(sparse_nm.nm_linear(x, values, indices, 2, 4, 16).double(), x.double() @ dense.t(), atol=1e-5)


def test_sparse_linear_module_runs_the_kernel(triton_kernels):
    from torch import nn

    from compress.prune.sparse_linear import SparseLinear

    lin = nn.Linear(32, 20, bias=True)
    mask = nm_mask(lin.weight.detach().abs(), 2, 4)
    sparse = SparseLinear.from_linear(lin, mask, (2, 4)).to(triton_kernels)
    x = torch.randn(2, 3, 32)
    ref = x.double() @ (lin.weight.detach() * mask).double().t() + lin.bias.detach().double()
    y = sparse(x.to(triton_kernels)).cpu()
    assert y.shape == (2, 3, 20) and (y.double() - ref).abs().max() / ref.abs().max() < 1e-5

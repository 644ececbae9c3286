"""Packed GEMV (N:M and bitmask) and the N:M expand kernel against float64 references; interpreted on the CPU."""
import pytest
import torch

from compress.kernels import sparse_gemv
from compress.kernels.sparse_nm import nm_decode_reference
from compress.prune.masks import nm_mask, unstructured_mask
from compress.prune.packing import pack_bitmask, pack_nm

TRITON_KERNEL = sparse_gemv._nm_gemv_kernel  # checked by the triton_kernels fixture (tests/kernels/conftest.py)


def rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("n,m,rows,cols,tokens", [(2, 4, 40, 96, 1), (2, 4, 24, 200, 5), (1, 2, 17, 64, 16),
                                                  (8, 16, 20, 128, 3)])
def test_nm_gemv(triton_kernels, n, m, rows, cols, tokens):
    dev = triton_kernels
    g = torch.Generator().manual_seed(rows + cols)
    w = torch.randn(rows, cols, generator=g)
    mask = nm_mask(torch.rand(rows, cols, generator=g), n, m)
    values, indices = pack_nm(w, mask, n, m)
    x, bias = torch.randn(tokens, cols, generator=g), torch.randn(rows, generator=g)
    assert sparse_gemv.gemv_supports_nm(m)
    y = sparse_gemv.nm_gemv(x.to(dev), values.to(dev), indices.to(dev), n, m, cols, bias.to(dev)).cpu()
    ref = x.double() @ (w * mask).double().t() + bias.double()
    assert y.shape == (tokens, rows) and rel(y, ref) < 1e-5


@pytest.mark.parametrize("rows,cols,tokens", [(24, 96, 1), (9, 130, 7)])
def test_bitmask_gemv(triton_kernels, rows, cols, tokens):
    dev = triton_kernels
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, cols, generator=g)
    mask = unstructured_mask(torch.rand(rows, cols, generator=g), 0.5)
    values, bitmask, offsets = pack_bitmask(w, mask)
    x = torch.randn(tokens, cols, generator=g)
    y = sparse_gemv.bitmask_gemv(x.to(dev), values.to(dev), bitmask.to(dev), offsets.to(dev), cols).cpu()
    assert rel(y, x.double() @ (w * mask).double().t()) < 1e-5


@pytest.mark.parametrize("n,m,rows,cols", [(2, 4, 40, 96), (4, 8, 20, 72), (1, 2, 33, 50)])
def test_nm_expand_matches_decode(triton_kernels, n, m, rows, cols):
    dev = triton_kernels
    g = torch.Generator().manual_seed(cols)
    w = torch.randn(rows, cols, generator=g)
    mask = nm_mask(torch.rand(rows, cols, generator=g), n, m)
    values, indices = pack_nm(w, mask, n, m)
    scratch = torch.full((rows * cols + 10,), float("nan"), device=dev)  # a larger reused buffer, not pre-zeroed
    out = sparse_gemv.nm_expand(values.to(dev), indices.to(dev), n, m, cols, scratch[: rows * cols].view(rows, cols))
    assert torch.equal(out.cpu(), nm_decode_reference(values, indices, n, m, cols))


@pytest.mark.parametrize("rows,cols,density", [(40, 96, 0.5), (9, 130, 0.3), (17, 64, 0.9)])
def test_bitmask_expand_matches_decode(triton_kernels, rows, cols, density):
    """Rows walked left to right with a running count of kept values, into a reused buffer that is not zeroed."""
    from compress.kernels.sparse_bitmask import bitmask_decode_reference

    dev = triton_kernels
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, cols, generator=g)
    mask = torch.rand(rows, cols, generator=g) < density
    mask[0] = False  # an empty row
    values, bitmask, offsets = pack_bitmask(w, mask)
    scratch = torch.full((rows * cols + 10,), float("nan"), device=dev)
    out = sparse_gemv.bitmask_expand(values.to(dev), bitmask.to(dev), offsets.to(dev), cols,
                                     scratch[: rows * cols].view(rows, cols))
    assert torch.equal(out.cpu(), bitmask_decode_reference(values, bitmask, cols))

"""The bitmask sparse linear kernel against a float64 dense reference; Triton runs under TRITON_INTERPRET=1."""
import pytest
import torch

from compress.kernels import sparse_bitmask
from compress.prune.packing import pack_bitmask

TRITON_KERNEL = sparse_bitmask._bitmask_linear_kernel  # checked by the triton_kernels fixture (tests/kernels/conftest.py)


def packed_case(rows, cols, density, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mask = torch.rand(rows, cols, generator=g) < density
    mask[0] = False  # an empty row
    values, bitmask, offsets = pack_bitmask(w.to(dtype), mask)
    return (w.to(dtype).float() * mask).double(), values, bitmask, offsets


@pytest.mark.parametrize("cols", [64, 45, 1, 8])
def test_unpack_gives_the_packed_mask(cols):
    """Bit c % 8 of byte c // 8 is column c (the byte lookup against a bit-by-bit reading)."""
    g = torch.Generator().manual_seed(cols)
    mask = torch.rand(9, cols, generator=g) < 0.5
    _, bitmask, _ = pack_bitmask(torch.randn(9, cols, generator=g), mask)
    by_bit = torch.tensor([[bool(int(bitmask[r, c // 8]) >> (c % 8) & 1) for c in range(cols)] for r in range(9)])
    assert torch.equal(by_bit, mask)
    assert torch.equal(sparse_bitmask.unpack_bitmask(bitmask, cols), mask)
    assert sparse_bitmask.unpack_bitmask(bitmask[:0], cols).shape == (0, cols)
    transposed = bitmask.t().contiguous().t()  # the same values in another memory layout
    assert torch.equal(sparse_bitmask.unpack_bitmask(transposed, cols), mask)


@pytest.mark.parametrize("cols", [64, 45, 1, 8])
def test_row_counts_are_the_kept_entries_of_each_row(cols):
    """A popcount over the bytes, with padding bits past the last column set in a file left out."""
    g = torch.Generator().manual_seed(cols)
    mask = torch.rand(9, cols, generator=g) < 0.5
    _, bitmask, offsets = pack_bitmask(torch.randn(9, cols, generator=g), mask)
    assert torch.equal(sparse_bitmask.bitmask_row_counts(bitmask, cols), mask.sum(1))
    assert torch.equal(torch.cumsum(mask.sum(1), 0) - mask.sum(1), offsets)
    if cols % 8:
        padded = bitmask.clone()
        padded[:, -1] |= 0xFF << (cols % 8) & 0xFF
        assert torch.equal(sparse_bitmask.bitmask_row_counts(padded, cols), mask.sum(1))


@pytest.mark.parametrize("cols", [64, 45])
def test_decode_reference_is_exact(cols):
    dense, values, bitmask, offsets = packed_case(10, cols, 0.4)
    assert bitmask.dtype == torch.uint8 and bitmask.shape == (10, -(-cols // 8))
    assert values.numel() == int((dense != 0).sum())
    assert torch.equal(sparse_bitmask.bitmask_decode_reference(values, bitmask, cols).double(), dense)
    assert offsets.tolist()[0] == 0 and offsets.tolist()[1] == 0  # row 0 keeps nothing


@pytest.mark.parametrize("rows,cols,tokens,density", [(24, 64, 5, 0.5), (37, 72, 18, 0.3), (8, 45, 1, 0.9)])
def test_triton_kernel_matches_reference(triton_kernels, rows, cols, tokens, density):
    dev = triton_kernels
    dense, values, bitmask, offsets = packed_case(rows, cols, density, seed=cols)
    x = torch.randn(tokens, cols)
    bias = torch.randn(rows)
    y = sparse_bitmask.bitmask_linear(*(t.to(dev) for t in (x, values, bitmask, offsets)), cols, bias.to(dev)).cpu()
    ref = x.double() @ dense.t() + bias.double()
    assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_reference_linear_matches_float64_bf16_values():
    dense, values, bitmask, offsets = packed_case(16, 32, 0.5, dtype=torch.bfloat16)
    x = torch.randn(4, 32)
    y = sparse_bitmask.bitmask_linear(x, values, bitmask, offsets, 32)
    ref = x.double() @ dense.t()
    assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_sparse_linear_module_runs_the_kernel(triton_kernels):
    from torch import nn

    from compress.prune.masks import unstructured_mask
    from compress.prune.sparse_linear import SparseLinear

    lin = nn.Linear(40, 18, bias=True)
    mask = unstructured_mask(lin.weight.detach().abs(), 0.7)
    sparse = SparseLinear.from_linear(lin, mask, None).to(triton_kernels)
    x = torch.randn(5, 40)
    ref = x.double() @ (lin.weight.detach() * mask).double().t() + lin.bias.detach().double()
    y = sparse(x.to(triton_kernels)).cpu()
    assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-5

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


@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["interpreter-tiles", "gpu-tiles"])
@pytest.mark.parametrize("n,m,rows,cols", [(2, 4, 40, 96), (4, 8, 20, 72), (1, 2, 33, 50)])
def test_nm_expand_matches_decode(triton_kernels, monkeypatch, n, m, rows, cols, gpu_tiles):
    dev = triton_kernels
    if gpu_tiles:  # the tile sizes a GPU launches (32 x 128), run by the interpreter
        monkeypatch.setattr(sparse_gemv, "interpreted", lambda: False)
    g = torch.Generator().manual_seed(cols)
    w = torch.randn(rows, cols, generator=g)
    mask = nm_mask(torch.rand(rows, cols, generator=g), n, m)
    values, indices = pack_nm(w, mask, n, m)
    scratch = torch.full((rows * cols + 10,), float("nan"), device=dev)  # a larger reused buffer, not pre-zeroed
    out = sparse_gemv.nm_expand(values.to(dev), indices.to(dev), n, m, cols, scratch[: rows * cols].view(rows, cols))
    assert torch.equal(out.cpu(), nm_decode_reference(values, indices, n, m, cols))


@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["interpreter-tiles", "gpu-tiles"])
@pytest.mark.parametrize("rows,cols,density", [(40, 96, 0.5), (9, 130, 0.3), (17, 300, 0.9)])
def test_bitmask_expand_matches_decode(triton_kernels, monkeypatch, rows, cols, density, gpu_tiles):
    """Rows walked left to right with a running count of kept values, into a reused buffer that is not zeroed."""
    from compress.kernels.sparse_bitmask import bitmask_decode_reference

    dev = triton_kernels
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, cols, generator=g)
    mask = torch.rand(rows, cols, generator=g) < density
    mask[0] = False  # an empty row
    values, bitmask, offsets = pack_bitmask(w, mask)
    if gpu_tiles:  # the tile sizes a GPU launches (4 x 256), run by the interpreter
        monkeypatch.setattr(sparse_gemv, "interpreted", lambda: False)
    scratch = torch.full((rows * cols + 10,), float("nan"), device=dev)
    out = sparse_gemv.bitmask_expand(values.to(dev), bitmask.to(dev), offsets.to(dev), cols,
                                     scratch[: rows * cols].view(rows, cols))
    assert torch.equal(out.cpu(), bitmask_decode_reference(values, bitmask, cols))


class _OneConfig:
    """Stands in for an autotuned kernel: launches the plain kernel with one configuration (the interpreter has no
    driver to time the autotuner's candidates with)."""

    def __init__(self, kernel, config):
        self.kernel, self.config = kernel, config

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel[grid(self.config)](*args, **kwargs, **self.config)


@pytest.mark.parametrize("tokens", [1, 11])
def test_every_gpu_gemv_configuration_is_exact(triton_kernels, monkeypatch, tokens):
    """Each tile configuration the GPU autotuner may pick after pruning (sparse_gemv._tile_fits_registers), for
    the N:M and the bitmask GEMV, run by the interpreter on a shape that leaves partial tiles and split-K slices."""
    dev = triton_kernels
    if dev != "cpu":
        pytest.skip("on a GPU the autotuner runs them")
    g = torch.Generator().manual_seed(tokens)
    rows, cols = 72, 200
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g)
    nm = nm_mask(torch.rand(rows, cols, generator=g), 2, 4)
    um = unstructured_mask(torch.rand(rows, cols, generator=g), 0.5)
    block_t = max(2, 1 << (tokens - 1).bit_length())
    monkeypatch.setattr(sparse_gemv, "interpreted", lambda: False)
    for tuned, kernel, mask, call in (
            ("_nm_gemv_tuned", sparse_gemv._nm_gemv_kernel, nm,
             lambda: sparse_gemv.nm_gemv(x, *pack_nm(w, nm, 2, 4), 2, 4, cols)),
            ("_bitmask_gemv_tuned", sparse_gemv._bitmask_gemv_kernel, um,
             lambda: sparse_gemv.bitmask_gemv(x, *pack_bitmask(w, um), cols))):
        configs = getattr(sparse_gemv, tuned).configs
        kept = sparse_gemv._tile_fits_registers(configs, {}, BLOCK_T=block_t)
        assert 0 < len(kept) < len(configs) or block_t == 2
        ref = x.double() @ (w * mask).double().t()
        for config in {tuple(sorted(c.kwargs.items())) for c in kept}:
            monkeypatch.setattr(sparse_gemv, tuned, _OneConfig(kernel, dict(config)))
            assert rel(call(), ref) < 1e-5, (tuned, config)

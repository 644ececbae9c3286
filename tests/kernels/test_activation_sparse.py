"""The gather products of the activation-sparse MLP: Triton (interpreted on the CPU), the C kernel and the torch
reference, each against a float64 product over the selected rows."""
import pytest
import torch

from compress.kernels import activation_sparse as ak
from compress.kernels.cpu_gather import cpu_library

TRITON_KERNEL = ak._gather_dot_kernel  # checked by the triton_kernels fixture (tests/kernels/conftest.py)


def case(n=40, d=72, tokens=3, k=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g)
    idx = torch.randperm(n, generator=g)[:k].sort().values
    x = torch.randn(tokens, d, generator=g)
    h = torch.randn(tokens, k, generator=g)
    return w, idx, x, h


def expected(w, idx, x, h):
    rows = w.double()[idx]
    return x.double() @ rows.t(), h.double() @ rows


def rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("tokens,k", [(1, 13), (3, 40), (5, 1)])
def test_torch_reference(tokens, k):
    w, idx, x, h = case(tokens=tokens, k=k)
    dot, axpy = expected(w, idx, x, h)
    assert rel(ak.gather_dot_reference(w, idx, x), dot) < 1e-5
    assert rel(ak.gather_axpy_reference(w, idx, h), axpy) < 1e-5


@pytest.mark.parametrize("tokens,k,d", [(1, 13, 72), (4, 40, 200), (2, 0, 64)])
def test_c_kernel(monkeypatch, tokens, k, d):
    if cpu_library() is None:
        pytest.skip("no C compiler here: the torch reference runs instead")
    monkeypatch.delenv("COMPRESS_KERNELS", raising=False)
    w, idx, x, h = case(d=d, tokens=tokens, k=k)
    assert ak._cpu_fast(w, x)
    dot, axpy = expected(w, idx, x, h)
    out_dot, out_axpy = ak.gather_dot(w, idx, x), ak.gather_axpy(w, idx, h)
    assert out_dot.shape == (tokens, k) and out_axpy.shape == (tokens, d)
    if k:
        assert rel(out_dot, dot) < 1e-5 and rel(out_axpy, axpy) < 1e-5
    else:
        assert not out_axpy.any()
    # a transposed view with unit row stride (how ActivationSparseMLP holds down_proj) gives the same rows
    wt = w.t().contiguous().t()
    assert ak._cpu_fast(wt, x) is False  # rows not contiguous: the reference handles it
    assert rel(ak.gather_dot(wt, idx, x), dot) < 1e-5 if k else True


@pytest.mark.parametrize("tokens,k,d", [(1, 13, 72), (3, 40, 130), (16, 7, 64)])
def test_triton_kernels(triton_kernels, tokens, k, d):
    dev = triton_kernels
    w, idx, x, h = case(d=d, tokens=tokens, k=k, seed=d)
    dot, axpy = expected(w, idx, x, h)
    out_dot = ak.gather_dot(w.to(dev), idx.to(dev), x.to(dev)).cpu()
    out_axpy = ak.gather_axpy(w.to(dev), idx.to(dev), h.to(dev)).cpu()
    assert rel(out_dot, dot) < 1e-5 and rel(out_axpy, axpy) < 1e-5

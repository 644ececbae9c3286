"""VQ-Logits kernels (codebook GEMM -> gather -> scale/bias, and the log-sum-exp / top-k variants that never write
the V logits) against a float64 torch computation; the Triton kernels run under TRITON_INTERPRET=1 on the CPU."""
import pytest
import torch

from compress.kernels import vq_logits as vk

TRITON_KERNEL = vk._logits_kernel  # checked by the triton_kernels fixture (tests/kernels/conftest.py)


def case(n, d, k, s, v, code_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = dict(
        hidden=torch.randn(n, d, generator=g), codebook=torch.randn(k, d, generator=g),
        codes=torch.randint(0, k + s, (v,), generator=g).to(code_dtype),
        scales=torch.rand(v, generator=g) + 0.5, biases=torch.randn(v, generator=g),
        shortlist_weight=torch.randn(s, d, generator=g) if s else None,
    )
    return parts


def float64_logits(p):
    """logit[n, v] = scale[v] * hidden[n] . table[codes[v]] + bias[v], written out in float64 without the kernels."""
    table = p["codebook"].double()
    if p["shortlist_weight"] is not None:
        table = torch.cat([table, p["shortlist_weight"].double()])
    rows = table[p["codes"].long()]                                  # [V, d]
    return (p["hidden"].double() @ rows.t()) * p["scales"].double() + p["biases"].double()


def on(p, device):
    return {k: (t.to(device) if t is not None else None) for k, t in p.items()}


CASES = [  # (tokens, d, K, shortlist, V, code dtype): odd sizes exercise every mask
    (5, 64, 40, 3, 600, torch.uint8),
    (17, 48, 300, 0, 777, torch.int16),
    (1, 32, 16, 5, 300, torch.int32),
]


@pytest.mark.parametrize("n,d,k,s,v,code_dtype", CASES)
def test_reference_matches_float64(n, d, k, s, v, code_dtype):
    p = case(n, d, k, s, v, code_dtype)
    want = float64_logits(p)
    got = vk.vq_logits_reference(**p)
    assert got.shape == (n, v)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
    lse = vk.vq_logsumexp_reference(**p, chunk=128)                  # several chunks
    assert torch.allclose(lse.double(), torch.logsumexp(want, -1), rtol=1e-5, atol=1e-4)
    vals, ids = vk.vq_topk_reference(**p, k=4, chunk=100)
    want_vals, want_ids = torch.topk(want, 4)
    assert torch.equal(ids, want_ids)
    assert torch.allclose(vals.double(), want_vals, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,d,k,s,v,code_dtype", CASES)
def test_triton_logits_match_float64(triton_kernels, n, d, k, s, v, code_dtype):
    p = case(n, d, k, s, v, code_dtype)
    want = float64_logits(p)
    got = vk.vq_logits(**on(p, triton_kernels)).cpu().double()
    err = (got - want).abs().max() / want.abs().max()
    assert err < 1e-5, err


@pytest.mark.parametrize("n,d,k,s,v,code_dtype", CASES)
def test_triton_reductions_match_float64(triton_kernels, n, d, k, s, v, code_dtype):
    p = case(n, d, k, s, v, code_dtype, seed=1)
    want = float64_logits(p)
    lse = vk.vq_logsumexp(**on(p, triton_kernels)).cpu().double()
    assert torch.allclose(lse, torch.logsumexp(want, -1), rtol=1e-5, atol=1e-4)
    vals, ids = vk.vq_topk(**on(p, triton_kernels), k=3)
    want_vals, want_ids = torch.topk(want, 3)
    assert torch.equal(ids.cpu(), want_ids)
    assert torch.allclose(vals.cpu().double(), want_vals, rtol=1e-5, atol=1e-4)


def test_leading_dims_and_dispatch(monkeypatch):
    p = case(6, 32, 16, 2, 100, torch.uint8)
    p["hidden"] = p["hidden"].view(2, 3, 32)
    monkeypatch.setenv("COMPRESS_KERNELS", "torch")
    out = vk.vq_logits(**p)
    assert out.shape == (2, 3, 100)
    assert torch.allclose(out.double().view(6, 100), float64_logits({**p, "hidden": p["hidden"].view(6, 32)}),
                          atol=1e-4)
    monkeypatch.delenv("COMPRESS_KERNELS")
    assert not vk.use_triton(p["hidden"])  # CPU tensors take the torch reference by default


def test_bad_arguments():
    p = case(2, 16, 8, 0, 50, torch.uint8)
    with pytest.raises(ValueError, match="k must be"):
        vk.vq_topk(**p, k=0)
    with pytest.raises(ValueError, match=r"\[V\]"):
        vk.vq_logits(**{**p, "scales": p["scales"][:10]})


@pytest.mark.parametrize("gemm", ["triton", "torch"])
def test_both_stage1_gemms_feed_the_fused_stage(triton_kernels, gemm):
    """Stage 1 by the Triton GEMM or by the BLAS library (the CUDA default), stage 2 Triton either way."""
    p = on(case(7, 64, 40, 3, 500, torch.int16, seed=2), triton_kernels)
    want = float64_logits({k: (t.cpu() if t is not None else None) for k, t in p.items()})
    got = vk.vq_logits_triton(**p, gemm=gemm).cpu().double()
    assert (got - want).abs().max() / want.abs().max() < 1e-5
    lse = vk.vq_logsumexp_triton(**p, gemm=gemm).cpu().double()
    assert torch.allclose(lse, torch.logsumexp(want, -1), rtol=1e-5, atol=1e-4)
    vals, ids = vk.vq_topk_triton(**p, k=2, gemm=gemm)
    assert torch.equal(ids.cpu(), want.topk(2).indices)
    with pytest.raises(ValueError, match="gemm"):
        vk.vq_logits_triton(**p, gemm="cublas")


def test_half_precision_output_is_written_in_the_input_dtype(triton_kernels):
    p = on(case(3, 32, 16, 0, 300, torch.uint8, seed=3), triton_kernels)
    half = {k: (t.half() if t is not None and t.is_floating_point() else t) for k, t in p.items()}
    out = vk.vq_logits(**half)
    assert out.dtype == torch.float16
    want = float64_logits({k: (t.cpu().double() if t is not None and t.is_floating_point() else
                              (t.cpu() if t is not None else None)) for k, t in half.items()})
    assert (out.cpu().double() - want).abs().max() / want.abs().max() < 2e-3

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,k,d", [(1, 13, 72), (4, 40, 200), (2, 0, 64), (7, 21, 100)])  # 7: 4 + 2 + 1
def test_c_kernel(monkeypatch, tokens, k, d, dtype, cpu_level):
    """float32 weights, and bfloat16 ones read as they are (a bf16 model's): float32 products of the same values."""
    if cpu_library() is None:
        pytest.skip("no C compiler here: the torch reference runs instead")
    monkeypatch.delenv("COMPRESS_KERNELS", raising=False)
    w, idx, x, h = case(d=d, tokens=tokens, k=k)
    w = w.to(dtype)
    assert ak._cpu_fast(w, x) and not ak._cpu_fast(w, x.to(torch.bfloat16))  # x and h: float32 only
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


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,d", [(37, 256), (20, 100)])
def test_quantized_gate_copy(monkeypatch, bits, n, d, cpu_level):
    """The gate predictor's int8 / int4 copy: round-to-nearest within half a step of each group's scale. Its product
    with x rounded to int8 per token and group (C kernel: VNNI, or AVX2 integer pairs, where the CPU has them; the
    torch reference) against
    the same integers summed in float64, and close to the exact float product."""
    monkeypatch.delenv("COMPRESS_KERNELS", raising=False)
    from compress.kernels.cpu_gather import qmatvec_library
    if cpu_library() is not None:  # a compiler is here: the predictor's kernel must build too (no silent fallback)
        assert qmatvec_library() is not None
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, d, generator=g)
    w[3, :7] *= 20  # an outlier: only its own group's scale grows
    codes, scales = ak.quantize_groups(w, bits)
    group = ak.quantization_group(d)
    assert codes.shape == (n, d if bits == 8 else d // 2) and scales.shape == (n, d // group)
    dequantized = ak.dequantize_groups(codes, scales, bits)
    step = scales.repeat_interleave(group, 1)
    assert ((dequantized - w).abs() <= step / 2 + 1e-6).all()
    assert (dequantized - w).abs().max() > 0.05 * step.min()  # it is a rounding, not a copy
    for tokens in (1, 3, 6, 20):  # 6: four at once (VNNI) + two; 20: past the GEMV kernel, the reference
        x = torch.randn(tokens, d, generator=g)
        x[0, 0], x[0, 1], x[0, 2] = 127.0, 2.5, -0.5  # group scale 1: ties, rounded half to even (2, -0) everywhere
        xq, sx = ak.round_activations(x, group)
        assert xq[0, 0, 1] == 2 and xq[0, 0, 2] == 0
        ints = ak.dequantize_groups(codes, torch.ones_like(scales), bits).double()
        want = torch.einsum("tgc,ngc,tg,ng->tn", xq.double(), ints.reshape(n, d // group, group), sx.double(),
                            scales.double())
        assert rel(ak.quantized_matvec(codes, scales, x, bits), want) < 1e-5
        assert rel(ak.quantized_matvec_reference(codes, scales, x, bits), want) < 1e-5
        assert rel(ak.quantized_matmul(codes, scales, x, bits), want) < 1e-5  # the prefill path, any token count
    # the prefill GEMM's shared buffer holds the last weight expanded, and a second weight of that shape reuses it
    w2 = torch.randn(n, d, generator=g)
    codes2, scales2 = ak.quantize_groups(w2, bits)
    x = torch.randn(20, d, generator=g)
    first = ak.quantized_matmul(codes, scales, x, bits)
    second = ak.quantized_matmul(codes2, scales2, x, bits)
    assert rel(second, ak.quantized_matvec_reference(codes2, scales2, x, bits)) < 1e-5
    assert torch.equal(ak.quantized_matmul(codes, scales, x, bits), first)
    assert len(ak._SCRATCH.buffers) == 1 and next(iter(ak._SCRATCH.buffers.values())).shape[0] == n
    # a bf16 model's decoding x: widened for the C kernel (it took the reference's Python loop: 2.3x the MLP's time)
    xb = torch.randn(2, d, generator=torch.Generator().manual_seed(2)).bfloat16()
    if qmatvec_library() is not None:
        called = []
        monkeypatch.setattr(ak, "quantized_matvec_reference", lambda *a: called.append(1))
    widened = ak.quantized_matvec(codes, scales, xb.float(), bits)
    assert rel(ak.quantized_matvec(codes, scales, xb, bits), widened) < 1e-6
    if qmatvec_library() is not None:
        assert not called
    monkeypatch.undo()
    trained = xb.float().requires_grad_()  # training through the gate: quantized_matmul's straight-through gradient
    ak.quantized_matvec(codes, scales, trained, bits).sum().backward()
    assert trained.grad is not None and trained.grad.abs().sum() > 0
    x = torch.randn(4, d, generator=g)  # no planted ties or outliers: how close a predictor it is
    rows = [i for i in range(n) if i != 3]  # (the outlier's group is coarse by design)
    exact = x.double() @ w[rows].double().t()
    assert rel(ak.quantized_matvec(codes, scales, x, bits)[:, rows], exact) < (0.02 if bits == 8 else 0.15)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_matvec_triton(triton_kernels, bits):
    """The Triton predictor product (CUDA, or the interpreter here) against the float64 sums of the same integers."""
    dev = triton_kernels
    g = torch.Generator().manual_seed(2)
    n, d = 24, 256
    codes, scales = ak.quantize_groups(torch.randn(n, d, generator=g), bits)
    ints = ak.dequantize_groups(codes, torch.ones_like(scales), bits).double().reshape(n, 2, 128)
    for tokens in (1, 3):
        x = torch.randn(tokens, d, generator=g)
        xq, sx = ak.round_activations(x, 128)
        want = torch.einsum("tgc,ngc,tg,ng->tn", xq.double(), ints, sx.double(), scales.double())
        out = ak.quantized_matvec(codes.to(dev), scales.to(dev), x.to(dev), bits)
        assert out.shape == (tokens, n) and rel(out.cpu(), want) < 1e-5


def test_quantized_gate_mlp_through_triton(triton_kernels):
    """The int8 copy as the gate (exact_gate=False) on the Triton path (CUDA, or the interpreter here): the decode
    path (Triton int8 product and gathers) equals the masked dense path over the expanded copy, and the float64 MLP
    of the dequantized weight and int8-rounded x with the same neurons kept."""
    from torch import nn
    from transformers.activations import ACT2FN

    from compress.activation_sparsity import ActivationSparseMLP

    dev = triton_kernels
    g = torch.Generator().manual_seed(3)
    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj = (nn.Linear(128, 96, bias=False) for _ in range(2))
    mlp.down_proj, mlp.act_fn = nn.Linear(96, 128, bias=False), ACT2FN["silu"]
    with torch.no_grad():
        for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            p.weight.copy_(torch.randn(p.weight.shape, generator=g) * 0.1)
        m = ActivationSparseMLP(mlp.to(dev), max_sparse_tokens=4, predictor_bits=8, exact_gate=False).eval()
        m.fit_predictor()
        m.adopt_quantized_gate()
        x = torch.randn(2, 128, generator=g).to(dev)
        xq, sx = ak.round_activations(x.cpu(), 128)
        w = ak.dequantize_groups(m.predictor_codes.cpu(), m.predictor_scales.cpu(), 8).double()
        gate = mlp.act_fn((xq * sx[..., None]).reshape(2, 128).double() @ w.t())
        tau = float(gate.abs().flatten().sort().values[gate.numel() // 2 - 1: gate.numel() // 2 + 1].mean())
        m.threshold.fill_(tau)  # between two gate values: no neuron sits on it
        keep = gate.abs() >= tau
        want = (gate * (x.cpu().double() @ mlp.up_proj.weight.cpu().double().t()) * keep) \
            @ mlp.down_proj.weight.cpu().double().t()
        assert "the gate from its int8 copy" in m.runtime_path(1)
        fast = m(x)
        m.max_sparse_tokens = 0
        masked = m(x)
    assert rel(fast.cpu(), want) < 1e-5 and rel(masked.cpu(), want) < 1e-5

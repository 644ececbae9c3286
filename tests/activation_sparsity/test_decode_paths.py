"""The activation-sparse MLP's decode paths: the gathers (C kernels and their torch reference) compute the masked
dense MLP exactly, with the exact gate, a low-rank or quantized gate predictor, the quantized copy as the gate, in
float32 and bf16; small MLPs take the masked dense path."""
import pytest
import torch

from compress.activation_sparsity import ActivationSparseMLP


def gap_threshold(scores: torch.Tensor) -> float:
    """Midway in the widest gap between neighbouring scores near their median: a score at the threshold itself would
    fall on either side by rounding (the C gathers sum in another order than torch's GEMM)."""
    s = scores.flatten().sort().values
    lo, hi = s.numel() // 2 - s.numel() // 8, s.numel() // 2 + s.numel() // 8
    k = lo + int((s[lo + 1:hi + 1] - s[lo:hi]).argmax())
    return float((s[k] + s[k + 1]) / 2)


def first_mlp(tiny_model, monkeypatch, kernels: str):
    """The first MLP of a tiny Llama; kernels "torch": the torch reference gathers instead of the C kernels."""
    if kernels == "torch":
        monkeypatch.setenv("COMPRESS_KERNELS", "torch")
    return tiny_model("llama").model.layers[0].mlp


@pytest.mark.parametrize("kernels", ["torch", "default"])
def test_sparse_path_equals_masked_dense_and_original(tiny_model, monkeypatch, kernels):
    mlp = first_mlp(tiny_model, monkeypatch, kernels)
    x = torch.randn(3, 64)
    with torch.no_grad():
        original = mlp(x)
        sparse = ActivationSparseMLP(mlp, threshold=0.0, max_sparse_tokens=4).eval()  # eval: the decode path
        torch.testing.assert_close(sparse(x), original, rtol=1e-5, atol=1e-6)  # threshold 0 keeps every neuron
        g = mlp.act_fn(mlp.gate_proj(x))
        sparse.threshold.fill_(gap_threshold(g.abs()))
        keep = g.abs() >= sparse.threshold
        expected = mlp.down_proj(g * mlp.up_proj(x) * keep)
        fast = sparse(x)                              # 3 tokens <= 4: only active rows are read
        sparse.max_sparse_tokens = 0
        masked = sparse(x)                            # the dense path with the same mask
    assert sparse.runtime_path(1) == "masked dense"
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fast, original, atol=1e-4)  # the threshold did drop neurons


@pytest.mark.parametrize("kernels", ["torch", "default"])
def test_gate_predictor_paths_agree(tiny_model, monkeypatch, kernels):
    """With a gate predictor the sparse path reads only the candidates' gate rows and still computes the masked dense
    MLP (mask = candidate and exact gate above threshold); full rank with a zero threshold changes nothing."""
    mlp = first_mlp(tiny_model, monkeypatch, kernels)
    x = torch.randn(3, 64)
    with torch.no_grad():
        plain = ActivationSparseMLP(mlp, threshold=0.0, max_sparse_tokens=4).eval()
        g = mlp.act_fn(mlp.gate_proj(x))
        plain.threshold.fill_(gap_threshold(g.abs()))
        full = ActivationSparseMLP(mlp, max_sparse_tokens=4, predictor_rank=64, threshold=float(plain.threshold)).eval()
        full.fit_predictor()  # rank = hidden: exact up to rounding
        torch.testing.assert_close(full.predicted_scores(x), g.abs(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(full(x), plain(x), rtol=1e-5, atol=1e-6)
        low = ActivationSparseMLP(mlp, max_sparse_tokens=4, predictor_rank=8, threshold=float(plain.threshold)).eval()
        low.fit_predictor()
        low.predictor_threshold.fill_(gap_threshold(low.predicted_scores(x)))
        keep = (g.abs() >= low.threshold) & low.candidates(x)
        expected = mlp.down_proj(g * mlp.up_proj(x) * keep)
        low.record, low.counts = True, [0, 0]
        fast = low(x)
        assert low.counts == [int(keep.sum()), keep.numel()]
        low.max_sparse_tokens = 0
        masked = low(x)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fast, plain(x), atol=1e-4)  # the predictor did drop active neurons


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_gate_predictor_paths_agree(tiny_model, bits):
    """predictor_bits: the gate's int8 / int4 copy picks the candidates; the sparse path (exact gate rows of the
    candidates only) equals the masked dense path, and the copy predicts the exact gate closely (unlike a low rank)."""
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    x = torch.randn(5, 64)
    with torch.no_grad():
        g = mlp.act_fn(mlp.gate_proj(x))
        middle = g.abs().flatten().sort().values[g.numel() // 2 - 1: g.numel() // 2 + 1]
        tau = float(middle.mean())  # between two gate values: no neuron sits on it (rounding would decide)
        m = ActivationSparseMLP(mlp, max_sparse_tokens=8, predictor_bits=bits, threshold=tau).eval()
        m.fit_predictor()
        assert m.predictor_codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
        error = (m.predicted_scores(x) - g.abs()).abs().max() / g.abs().max()
        assert error < (0.02 if bits == 8 else 0.2)
        m.predictor_threshold.fill_(tau * 0.9)
        keep = (g.abs() >= tau) & m.candidates(x)
        assert keep.sum() >= 0.95 * (g.abs() >= tau).sum()  # candidates cover the active neurons
        expected = mlp.down_proj(g * mlp.up_proj(x) * keep)
        assert f"int{bits} predicted candidates" in m.runtime_path(1)
        from compress.kernels.activation_sparse import _cpu_fast
        assert m._select_in_c() == _cpu_fast(mlp.up_proj.weight, x)  # the C selection runs wherever C gathers do
        fast = m(x)
        m.max_sparse_tokens = 0
        masked = m(x)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [0, 4])
def test_bf16_model_decodes_in_c_from_its_bf16_weights(tiny_model, bits):
    """A bf16 model (what `dtype: auto` loads on AVX512-BF16 CPUs) decodes through the C kernels, which read its bf16
    weights and compute in float32 (it ran the torch gathers before, ~9x slower than its dense MLP): the output is
    the float32 masked dense MLP over the same weights widened, with the same neurons kept, rounded to bf16 once."""
    import copy

    from compress.kernels.cpu_gather import cpu_library
    if cpu_library() is None:
        pytest.skip("no C compiler here: the torch reference runs instead")
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 64).to(torch.bfloat16)
    with torch.no_grad():
        m = ActivationSparseMLP(mlp, max_sparse_tokens=4, predictor_bits=bits, neuron_scaling=True).eval()
        m.neuron_scale.copy_(torch.rand(m.neuron_scale.shape) + 0.5)
        m = copy.deepcopy(m).to(torch.bfloat16)
        reference = copy.deepcopy(m).float()  # the same values, widened exactly
        s = reference.scores(reference.act_fn(reference.gate_proj(x.float())))
        middle = s.flatten().sort().values[s.numel() // 2 - 1: s.numel() // 2 + 1]
        for module in (m, reference):  # between two scores (bf16-representable), no neuron sits on it
            module.threshold.fill_(float(middle.mean().to(torch.bfloat16)))
        if bits:
            m.fit_predictor(torch.bfloat16)
            reference.fit_predictor(torch.bfloat16)  # rounded like the bf16 model's
            p = reference.predicted_scores(x.float())
            for module in (m, reference):
                module.predictor_threshold.fill_(float(p.quantile(0.4).to(torch.bfloat16)))
        assert m.runtime_path(1).startswith("active rows only (C gather")
        m.record, m.counts = True, [0, 0]
        fast = m(x)
        reference.max_sparse_tokens = 0  # the masked dense path, float32
        reference.record, reference.counts = True, [0, 0]
        expected = reference(x.float())
    assert fast.dtype == torch.bfloat16
    assert m.counts == reference.counts and 0 < m.counts[0] < m.counts[1]  # the same neurons kept
    torch.testing.assert_close(fast.float(), expected.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-5)


def test_small_mlps_decode_masked_dense_and_the_layout_is_set_up_front(tiny_model, monkeypatch):
    """Below MIN_GATHER_WEIGHTS a CPU MLP decodes through the masked dense path (the gathers lose there), with the
    same output; an MLP that gathers has down_proj laid out column-major when built, not on its first decoding step."""
    from compress.prune.runtime import runtime_plan

    monkeypatch.undo()  # the default threshold (the suite's autouse fixture lowers it to 0)
    assert ActivationSparseMLP.MIN_GATHER_WEIGHTS == 8_000_000
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 64)
    with torch.no_grad():
        m = ActivationSparseMLP(mlp, threshold=0.1, max_sparse_tokens=4).eval()
        assert m.down_proj.weight.stride(1) == 1  # a small MLP never gathers: its layout is left alone
        assert m.runtime_path(1) == "masked dense (a small MLP: gathers would be slower)"
        small = m(x)
        monkeypatch.setattr(ActivationSparseMLP, "MIN_GATHER_WEIGHTS", 0)
        m = ActivationSparseMLP(mlp, threshold=0.1, max_sparse_tokens=4).eval()
        assert m.down_proj.weight.stride(0) == 1  # one that gathers is laid out column-major when built
        assert m.runtime_path(1).startswith("active rows only")
        gathered = m(x)
    torch.testing.assert_close(small, gathered, rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    plan = runtime_plan(torch.nn.ModuleDict({"mlp": m}))
    assert "masked dense (an MLP of" in plan["mlp"]


@pytest.mark.parametrize("kernels", ["torch", "default"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_copy_as_the_gate_paths_agree(tiny_model, monkeypatch, kernels, bits):
    """exact_gate=False: the int8 / int4 copy is the gate itself. The decode path (no fp32 gate row read) and the
    masked dense path both equal the MLP computed by hand from the dequantized codes and int8-rounded x."""
    from compress.kernels.activation_sparse import dequantize_groups, round_activations

    mlp = first_mlp(tiny_model, monkeypatch, kernels)
    x = torch.randn(3, 64)
    with torch.no_grad():
        exact = mlp.act_fn(mlp.gate_proj(x))
        m = ActivationSparseMLP(mlp, max_sparse_tokens=4, predictor_bits=bits, exact_gate=False).eval()
        original = mlp.gate_proj.weight.clone()
        m.fit_predictor()
        assert torch.equal(mlp.gate_proj.weight, original)  # kept until the copy is adopted (calibration accepted it)
        m.adopt_quantized_gate()
        copy = dequantize_groups(m.predictor_codes, m.predictor_scales, bits)
        assert torch.equal(mlp.gate_proj.weight, copy)  # gate_proj holds the copy expanded (no float copy added)
        assert not mlp.gate_proj.weight.requires_grad  # the gate is its codes: frozen
        xq, sx = round_activations(x, 64)
        pre = (xq * sx[..., None]).reshape(3, 64) @ copy.t()
        g = mlp.act_fn(pre)
        assert 0 < (g - exact).abs().max() < (0.05 if bits == 8 else 0.3) * exact.abs().max()  # rounded, close
        middle = g.abs().flatten().sort().values[g.numel() // 2 - 1: g.numel() // 2 + 1]
        m.threshold.fill_(float(middle.mean()))  # between two gate values: no neuron sits on it
        keep = g.abs() >= m.threshold
        expected = mlp.down_proj(g * mlp.up_proj(x) * keep)
        gate_rows_read = []
        hook = mlp.gate_proj.register_forward_hook(lambda *a: gate_rows_read.append(1))
        assert f"the gate from its int{bits} copy" in m.runtime_path(1)
        m.record, m.counts = True, [0, 0]
        fast = m(x)
        assert m.counts == [int(keep.sum()), keep.numel()]
        m.max_sparse_tokens = 0
        masked = m(x)
        hook.remove()
    assert not gate_rows_read  # gate_proj is never called
    torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(masked, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # prefill-sized input: one GEMM on the expanded weight, re-expanded after the codes change
        from compress.kernels.activation_sparse import quantized_matvec_reference
        xp = torch.randn(20, 64)
        torch.testing.assert_close(m.gate_pre(xp), quantized_matvec_reference(m.predictor_codes, m.predictor_scales,
                                                                             xp, bits), rtol=1e-5, atol=1e-5)
        m.predictor_scales.mul_(2)  # what loading other codes does
        torch.testing.assert_close(m.gate_pre(xp), quantized_matvec_reference(m.predictor_codes, m.predictor_scales,
                                                                             xp, bits), rtol=1e-5, atol=1e-5)
        assert torch.equal(mlp.gate_proj.weight, 2 * copy)
        m.predictor_scales.div_(2)
    # training (e.g. a recover pass after this one): x's rounding passes gradients straight through, so x gets
    # about the exact gate's gradient (round's own would be zero: only up_proj's share would reach x)
    m.train()
    m.threshold.fill_(0.0)
    xg = torch.randn(20, 64, requires_grad=True)
    m(xg).square().sum().backward()
    xe = xg.detach().clone().requires_grad_(True)
    mlp.gate_proj.weight.copy_(original)
    mlp.down_proj(mlp.act_fn(mlp.gate_proj(xe)) * mlp.up_proj(xe)).square().sum().backward()
    cosine = torch.nn.functional.cosine_similarity(xg.grad.flatten(), xe.grad.flatten(), dim=0)
    assert cosine > (0.999 if bits == 8 else 0.98), cosine  # without the straight-through pass: ~0.03
    with pytest.raises(ValueError, match="predictor_bits"):
        ActivationSparseMLP(mlp, exact_gate=False)


@pytest.mark.parametrize("kernels", ["torch", "default"])
def test_calls_that_need_gradients_take_the_masked_dense_path(tiny_model, monkeypatch, kernels):
    """In eval mode with gradients on, the C gathers returned an output without a graph: an input's or a trained
    layer's gradient came back None or wrong, silently (an audit's find). Such calls take the masked dense path,
    with the same mask and so the same output."""
    mlp = first_mlp(tiny_model, monkeypatch, kernels)
    x = torch.randn(3, 64, requires_grad=True)
    with torch.no_grad():
        g = mlp.act_fn(mlp.gate_proj(x))
    sparse = ActivationSparseMLP(mlp, threshold=gap_threshold(g.abs()), max_sparse_tokens=4).eval()
    gathered = []
    gathers = sparse._sparse
    monkeypatch.setattr(sparse, "_sparse", lambda x2: gathered.append(1) or gathers(x2))
    y = sparse(x)  # the weights require grad here (a tiny_model's do)
    assert y.requires_grad and not gathered
    y.square().sum().backward()
    keep = g.abs() >= sparse.threshold
    x_ref = x.detach().clone().requires_grad_(True)
    mlp.zero_grad()
    mlp.down_proj(mlp.act_fn(mlp.gate_proj(x_ref)) * mlp.up_proj(x_ref) * keep).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and without gradients, the gathers
        torch.testing.assert_close(sparse(x), y.detach(), rtol=1e-5, atol=1e-6)
    assert gathered


def test_bf16_scores_meet_the_float32_threshold_on_every_path(tiny_model, monkeypatch):
    """The masked dense path rounded the threshold to bf16 before comparing, the C gathers compare in float32: a
    score between the two kept its neuron on one path and dropped it on the other."""
    mlp = tiny_model("llama").model.layers[0].mlp.to(torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    sparse = ActivationSparseMLP(mlp, max_sparse_tokens=4).eval()
    with torch.no_grad():
        g = mlp.act_fn(mlp.gate_proj(x))
        score = g.abs().flatten().float().sort().values[g.numel() // 2]
        # just above a bf16 score: the threshold rounded to bf16 is that score (kept), the float32 one is above it
        sparse.threshold.fill_(float(score) * (1 + 2 ** -10))
        assert torch.tensor(float(sparse.threshold)).to(torch.bfloat16).float() == score
        _, keep = sparse.gate(x)
        expected = g.abs().float() >= sparse.threshold
        assert torch.equal(keep, expected) and not keep.flatten()[(g.abs().float() == score).flatten()].any()
        fast = sparse(x)
        sparse.max_sparse_tokens = 0
        masked = sparse(x)
    torch.testing.assert_close(fast, masked, rtol=2e-2, atol=2e-2)

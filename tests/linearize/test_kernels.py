"""GLA and sliding-window attention: the chunked / blocked torch paths against their references, forward and
backward, in float64."""
import pytest
import torch
import torch.nn.functional as F

from compress.kernels.gla import gated_linear_attention, gla_chunked, gla_recurrent_reference
from compress.kernels.window_attention import window_attention_blocked, window_attention_reference


def gla_inputs(b=2, hq=4, hkv=2, t=37, dk=8, dv=6, gate_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    raw_k = rnd(b, hkv, t, dk) * 3
    q = rnd(b, hq, t, dk).softmax(-1).requires_grad_()
    k = raw_k.softmax(-1).requires_grad_()
    g = (F.logsigmoid(raw_k) * gate_scale).requires_grad_()
    v = rnd(b, hkv, t, dv).requires_grad_()
    s0 = rnd(b, hkv, dk, dv).requires_grad_()
    return q, k, v, g, s0


@pytest.mark.parametrize("hq,hkv,t,chunk", [(4, 2, 37, 8), (4, 4, 16, 16), (6, 2, 5, 16), (2, 1, 40, 3)])
def test_chunked_equals_recurrence_forward_and_backward(hq, hkv, t, chunk, assert_chunked_matches_reference):
    assert_chunked_matches_reference(gla_recurrent_reference, gla_chunked, gla_inputs(hq=hq, hkv=hkv, t=t), chunk)


def test_chunked_stays_finite_with_strong_gates_in_float32():
    # log-gates of -60 per token: a factorized exp(b_i) * exp(-b_j) form would overflow float32 within one chunk
    q, k, v, g, s0 = (x.detach().float() for x in gla_inputs(t=64, gate_scale=40.0))
    o, s = gla_chunked(q, k, v, g, s0, chunk_size=32)
    ref_o, ref_s = gla_recurrent_reference(q.double(), k.double(), v.double(), g.double(), s0.double())
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o.double(), ref_o, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [12, 16, 64])
def test_strong_and_weak_key_dimensions_split_between_the_two_chunk_forms(chunk, assert_chunked_matches_reference):
    # dimensions 1 and 5 forget within a chunk (log-gates ~ -20 per token): they must take the pairwise form (the
    # factorized one would overflow e^-b) while the others take the matmuls; outputs, state rows and gradients agree
    q, k, v, g, s0 = gla_inputs(t=45)
    scale = torch.full((8,), 0.25, dtype=torch.float64)
    scale[[1, 5]] = 20.0
    g = (g.detach() * scale - scale.eq(20.0) * 1.0).requires_grad_()
    chunk_decay = g.detach()[..., :chunk, :].sum(-2)
    assert (chunk_decay[..., [1, 5]] < -40).all() and (chunk_decay[..., [0, 2, 3, 4, 6, 7]] > -40).all()
    assert_chunked_matches_reference(gla_recurrent_reference, gla_chunked, (q, k, v, g, s0), chunk)


def test_factorized_form_keeps_float32_precision_near_its_decay_limit():
    # every chunk's log-gates sum to just above -40 (the factorized form's limit: factors up to e^40)
    q, k, v, g, s0 = (x.detach() for x in gla_inputs(t=128))
    g = torch.full_like(g, -39.0 / 64)
    o, s = gla_chunked(*(x.float() for x in (q, k, v, g, s0)), chunk_size=64)
    ref_o, ref_s = gla_recurrent_reference(q, k, v, g, s0)
    torch.testing.assert_close(o.double(), ref_o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-5, atol=1e-6)


def test_half_precision_inputs_stay_finite_when_called_directly():
    # gates of -0.4 per token sum to -26 over a chunk of 64: safe for float32's factorized form, not for float16's
    q, k, v, g, s0 = (x.detach() for x in gla_inputs(t=70))
    g = torch.full_like(g, -0.4)
    o, s = gla_chunked(*(x.half() for x in (q, k, v, g, s0)), chunk_size=64)
    ref_o, ref_s = gla_recurrent_reference(q, k, v, g, s0)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o.double(), ref_o, rtol=2e-2, atol=2e-2)


def test_dispatch_continues_a_state_token_by_token():
    q, k, v, g, s0 = (x.detach() for x in gla_inputs(t=12))
    full, final = gated_linear_attention(q, k, v, g, s0)
    o, state = gated_linear_attention(q[:, :, :7], k[:, :, :7], v[:, :, :7], g[:, :, :7], s0)
    outs = [o]
    for i in range(7, 12):
        o, state = gated_linear_attention(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], g[:, :, i:i + 1],
                                          state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, final, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("past,t,window", [(0, 37, 8), (7, 37, 8), (7, 3, 8), (15, 50, 16), (0, 8, 8)])
def test_blocked_window_attention_equals_dense_reference(past, t, window):
    gen = torch.Generator().manual_seed(past + t)
    b, hq, hkv, d = 2, 4, 2, 8
    q = torch.randn(b, hq, t, d, generator=gen, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(b, hkv, past + t, d, generator=gen, dtype=torch.float64, requires_grad=True)
    values = torch.randn(b, hkv, past + t, d, generator=gen, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(b, past + t, generator=gen) > 0.2
    valid[0, :3] = False  # a padding query sees nothing: zeros, not NaN
    ref = window_attention_reference(q, keys, values, valid, window, 0.3)
    out = window_attention_blocked(q, keys, values, valid, window, 0.3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for a, c in zip(torch.autograd.grad((out * w).sum(), (q, keys, values)),
                    torch.autograd.grad((ref * w).sum(), (q, keys, values))):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-11)


def test_blocked_window_attention_never_hands_a_fully_masked_row_to_the_fused_kernel(monkeypatch):
    """Some fused attention kernels return NaN for a row that sees no key (padding queries): every row given to
    scaled_dot_product_attention sees at least one key, and such rows still come out as zeros."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    masks = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, attn_mask=None, **k: masks.append(attn_mask) or sdpa(*a, attn_mask=attn_mask, **k))
    gen = torch.Generator().manual_seed(5)
    q, keys, values = (torch.randn(2, h, 40, 8, generator=gen) for h in (4, 2, 2))
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :13] = False  # left padding longer than a block of 8
    out = window_attention_blocked(q, keys, values, valid, 8, 0.3)
    assert masks and masks[0].any(-1).all()
    assert (out[1, :, :13] == 0).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out, window_attention_reference(q, keys, values, valid, 8, 0.3))


def test_window_reference_matches_plain_softmax_attention():
    """The dense reference itself against a per-query loop of textbook attention (GQA by repetition)."""
    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, d, past, t, window = 1, 4, 2, 8, 5, 9, 6
    q = torch.randn(b, hq, t, d, generator=gen, dtype=torch.float64)
    keys = torch.randn(b, hkv, past + t, d, generator=gen, dtype=torch.float64)
    values = torch.randn(b, hkv, past + t, d, generator=gen, dtype=torch.float64)
    valid = torch.ones(b, past + t, dtype=torch.bool)
    valid[0, 2] = False
    out = window_attention_reference(q, keys, values, valid, window, d ** -0.5)
    kk, vv = keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1)
    for i in range(t):
        pos = past + i
        idx = [j for j in range(max(0, pos - window + 1), pos + 1) if valid[0, j]]
        w = (q[0, :, i].unsqueeze(1) @ kk[0, :, idx].transpose(-1, -2) * d ** -0.5).softmax(-1)
        torch.testing.assert_close(out[0, :, i], (w @ vv[0, :, idx]).squeeze(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", ["gla", "delta_rule", "gsa"])
def test_a_log_gate_of_minus_infinity_forgets_instead_of_giving_nan(kernel, dtype):
    # an overflowing projection can give a gate of exactly 0 (log-gate -inf): the chunk forms subtract cumulative
    # log-gates (-inf - -inf = NaN) unless floored; the step-by-step recurrence simply forgets there
    from compress.kernels.delta_rule import delta_rule_chunked, delta_rule_recurrent_reference
    from compress.kernels.gsa import gsa_chunked, gsa_recurrent_reference

    gen = torch.Generator().manual_seed(3)
    t, dk = 21, 4
    q = torch.randn(1, 2, t, dk, generator=gen, dtype=dtype).softmax(-1).requires_grad_()
    k = torch.randn(1, 1, t, dk, generator=gen, dtype=dtype).softmax(-1).requires_grad_()
    v = torch.randn(1, 1, t, 3, generator=gen, dtype=dtype).requires_grad_()
    width = {"gla": dk, "delta_rule": None, "gsa": 5}[kernel]
    g = F.logsigmoid(torch.randn(1, 1, t, width or 1, generator=gen, dtype=dtype))
    g[..., 5, :1] = -float("inf")  # one dimension forgets at token 5, every one at token 9
    g[..., 9, :] = -float("inf")
    g = (g if width else g.squeeze(-1)).requires_grad_()
    if kernel == "gla":
        run, ref, args = gla_chunked, gla_recurrent_reference, (q, k, v, g)
    elif kernel == "delta_rule":
        beta = torch.rand(1, 1, t, generator=gen, dtype=dtype)
        run, ref, args = delta_rule_chunked, delta_rule_recurrent_reference, (q, k, v, g, beta)
    else:
        run, ref, args = gsa_chunked, gsa_recurrent_reference, (q, k, v, g)
    o, s = run(*args, chunk_size=8)
    ref_o, ref_s = ref(*(x.detach().double() for x in args))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(o.double(), ref_o, **tol)
    torch.testing.assert_close(s.double(), ref_s, **tol)
    grads = torch.autograd.grad(o.sum() + s.sum(), (q, k, v, g))
    assert all(torch.isfinite(x).all() for x in grads)


@pytest.mark.parametrize("kernel", ["gla", "delta_rule", "gsa"])
def test_a_prompt_without_gradients_goes_in_segments_with_the_state_carried(kernel, monkeypatch):
    """Segments of PROMPT_SEGMENT tokens (a 32k prompt in one chunked call held every chunk's float32 states: 2x
    the dense model's peak memory) give the recurrence's output and state, in float64; with gradients, one call."""
    import importlib

    from compress.kernels import gla

    module = importlib.import_module(f"compress.kernels.{kernel}")
    run, ref, chunked_name = (getattr(module, name) if i < 2 else name for i, name in enumerate({
        "gla": ("gated_linear_attention", "gla_recurrent_reference", "gla_chunked"),
        "delta_rule": ("gated_delta_rule", "delta_rule_recurrent_reference", "delta_rule_chunked"),
        "gsa": ("gated_slot_attention", "gsa_recurrent_reference", "gsa_chunked")}[kernel]))
    gen = torch.Generator().manual_seed(5)
    t, dk = 45, 4  # segments of 16, 16, 13
    q = torch.randn(1, 2, t, dk, generator=gen, dtype=torch.float64).softmax(-1)
    k = torch.randn(1, 1, t, dk, generator=gen, dtype=torch.float64).softmax(-1)
    v = torch.randn(1, 1, t, 3, generator=gen, dtype=torch.float64)
    width = {"gla": dk, "delta_rule": None, "gsa": 5}[kernel]
    g = F.logsigmoid(torch.randn(1, 1, t, width or 1, generator=gen, dtype=torch.float64))
    g = g if width else g.squeeze(-1)
    extra = (torch.rand(1, 1, t, generator=gen, dtype=torch.float64),) if kernel == "delta_rule" else ()
    calls = []
    chunked = getattr(module, chunked_name)
    monkeypatch.setattr(module, chunked_name, lambda *a: calls.append(a[0].shape[2]) or chunked(*a))
    monkeypatch.setattr(gla, "PROMPT_SEGMENT", 16)
    ref_o, ref_s = ref(q, k, v, g, *extra)
    with torch.no_grad():
        o, s = run(q, k, v, g, *extra, chunk_size=8)
    torch.testing.assert_close(o, ref_o, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s, ref_s, rtol=1e-10, atol=1e-12)
    assert calls == [16, 16, 13]
    calls.clear()
    run(q.requires_grad_(), k, v, g, *extra, chunk_size=8)[0].sum().backward()  # training: one call
    assert calls == [45] and q.grad is not None

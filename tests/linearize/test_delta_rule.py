"""Gated delta rule (MoM's memories): the chunked WY/UT torch path against the step-by-step recurrence, forward and
backward, in float64; identity steps (padding, unrouted tokens) leave the state alone."""
import pytest
import torch
import torch.nn.functional as F

from compress.kernels.delta_rule import delta_rule_chunked, delta_rule_recurrent_reference, gated_delta_rule


def delta_inputs(b=2, hq=4, hkv=2, t=37, dk=8, dv=6, gate_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = rnd(b, hq, t, dk).softmax(-1).requires_grad_()
    k = F.normalize(rnd(b, hkv, t, dk), dim=-1).requires_grad_()
    v = rnd(b, hkv, t, dv).requires_grad_()
    g = (F.logsigmoid(rnd(b, hkv, t) * 2) * gate_scale).requires_grad_()
    beta = torch.sigmoid(rnd(b, hkv, t) * 2).requires_grad_()
    s0 = rnd(b, hkv, dk, dv).requires_grad_()
    return q, k, v, g, beta, s0


@pytest.mark.parametrize("hq,hkv,t,chunk", [(4, 2, 37, 8), (4, 4, 16, 16), (6, 2, 5, 16), (2, 1, 40, 3)])
def test_chunked_equals_recurrence_forward_and_backward(hq, hkv, t, chunk, assert_chunked_matches_reference):
    assert_chunked_matches_reference(delta_rule_recurrent_reference, delta_rule_chunked, delta_inputs(hq=hq, hkv=hkv, t=t), chunk)


def test_recurrence_is_the_delta_rule():
    """One step by the textbook matrix form alpha (I - beta k k^T) S + beta k v^T."""
    q, k, v, g, beta, s0 = (x.detach() for x in delta_inputs(b=1, hq=2, hkv=2, t=1))
    _, s = delta_rule_recurrent_reference(q, k, v, g, beta, s0)
    kk = k[0, :, 0]
    eye = torch.eye(kk.shape[-1], dtype=kk.dtype)
    for h in range(2):
        expected = g[0, h, 0].exp() * (eye - beta[0, h, 0] * torch.outer(kk[h], kk[h])) @ s0[0, h] \
            + beta[0, h, 0] * torch.outer(kk[h], v[0, h, 0])
        torch.testing.assert_close(s[0, h], expected)


def test_identity_steps_leave_the_state_unchanged_and_strong_decay_stays_finite():
    q, k, v, g, beta, s0 = (x.detach() for x in delta_inputs(t=24, gate_scale=40.0))
    skip = torch.zeros(24, dtype=torch.bool)
    skip[3:11] = True  # tokens this memory does not see: k = g = beta = 0
    k2, g2, b2 = k.masked_fill(skip[:, None], 0.0), g.masked_fill(skip, 0.0), beta.masked_fill(skip, 0.0)
    o, s = delta_rule_chunked(q, k2, v, g2, b2, s0, chunk_size=8)
    kept = ~skip
    ref_o, ref_s = delta_rule_recurrent_reference(q[:, :, kept], k[:, :, kept], v[:, :, kept], g[:, :, kept],
                                                  beta[:, :, kept], s0)
    torch.testing.assert_close(s, ref_s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(o[:, :, kept], ref_o, rtol=1e-10, atol=1e-12)
    o32, _ = delta_rule_chunked(*(x.float() for x in (q, k, v, g, beta, s0)), chunk_size=24)
    assert torch.isfinite(o32).all()
    ref_full, _ = delta_rule_recurrent_reference(q, k, v, g, beta, s0)
    torch.testing.assert_close(o32.double(), ref_full, rtol=1e-4, atol=1e-4)


def test_dispatch_continues_a_state_token_by_token():
    q, k, v, g, beta, s0 = (x.detach() for x in delta_inputs(t=12))
    full, final = gated_delta_rule(q, k, v, g, beta, s0, chunk_size=4)
    o, state = gated_delta_rule(q[:, :, :7], k[:, :, :7], v[:, :, :7], g[:, :, :7], beta[:, :, :7], s0, chunk_size=4)
    outs = [o]
    for i in range(7, 12):
        o, state = gated_delta_rule(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], g[:, :, i:i + 1],
                                    beta[:, :, i:i + 1], state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, final, rtol=1e-12, atol=1e-12)

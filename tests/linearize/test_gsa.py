"""Gated slot attention (gate gsa): the chunked two-pass torch path against the step-by-step recurrence, forward and
backward, in float64; padding steps leave the state alone; the cache carries the state token by token."""
import pytest
import torch
import torch.nn.functional as F

from compress.kernels.gsa import gated_slot_attention, gsa_chunked, gsa_recurrent_reference


def gsa_inputs(b=2, hq=4, hkv=2, t=29, dk=8, dv=6, slots=4, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = rnd(b, hq, t, dk).softmax(-1).requires_grad_()
    k = rnd(b, hkv, t, dk).softmax(-1).requires_grad_()
    v = rnd(b, hkv, t, dv).requires_grad_()
    g = F.logsigmoid(rnd(b, hkv, t, slots) * 2).requires_grad_()
    s0 = rnd(b, hkv, slots, dk + dv).requires_grad_()
    return q, k, v, g, s0


@pytest.mark.parametrize("hq,hkv,t,chunk", [(4, 2, 29, 8), (2, 2, 16, 16), (6, 2, 5, 4)])
def test_chunked_equals_recurrence_forward_and_backward(hq, hkv, t, chunk, assert_chunked_matches_reference):
    assert_chunked_matches_reference(gsa_recurrent_reference, gsa_chunked, gsa_inputs(hq=hq, hkv=hkv, t=t), chunk)


def test_padding_steps_and_token_by_token_continuation():
    q, k, v, g, s0 = (x.detach() for x in gsa_inputs(t=14))
    skip = torch.zeros(14, dtype=torch.bool)
    skip[2:6] = True  # k = v = g = 0: nothing written, nothing forgotten
    k2, v2, g2 = (x.masked_fill(skip[:, None], 0.0) for x in (k, v, g))
    o, s = gsa_chunked(q, k2, v2, g2, s0, chunk_size=4)
    ref_o, ref_s = gsa_recurrent_reference(q[:, :, ~skip], k[:, :, ~skip], v[:, :, ~skip], g[:, :, ~skip], s0)
    torch.testing.assert_close(s, ref_s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(o[:, :, ~skip], ref_o, rtol=1e-10, atol=1e-12)
    full, final = gated_slot_attention(q, k, v, g, s0, chunk_size=4)
    out, state = gated_slot_attention(q[:, :, :9], k[:, :, :9], v[:, :, :9], g[:, :, :9], s0, chunk_size=4)
    outs = [out]
    for i in range(9, 14):
        out, state = gated_slot_attention(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], g[:, :, i:i + 1], state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, final, rtol=1e-12, atol=1e-12)

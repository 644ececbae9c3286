"""On a CUDA device with fla-core (skipped elsewhere): prefill of the GLA and gated-delta-rule layers runs fla's
chunked kernels (`gla_fla`, `delta_rule_fla`); they compute what the plain recurrence computes, GQA heads included,
from an initial state, forward and backward (the recovery's LoRA trains through them)."""
import pytest
import torch

from compress.kernels import delta_rule as D
from compress.kernels import gla as G

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and G.fla_available()),
                                reason="needs a CUDA device and fla-core (pip install 'compress[fla]')")


def inputs(delta: bool, b=2, hq=8, hkv=2, t=200, d=64, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    q = rand(b, hq, t, d).softmax(-1)  # Liger's feature map: softmax over the head dimension
    k = rand(b, hkv, t, d).softmax(-1) if not delta else torch.nn.functional.normalize(rand(b, hkv, t, d), dim=-1)
    v = rand(b, hkv, t, d)
    if delta:  # scalar log-decay and write strength per token and head
        g = torch.nn.functional.logsigmoid(rand(b, hkv, t) + 4)
        return q, k, v, g, torch.sigmoid(rand(b, hkv, t)), rand(b, hkv, d, d) * 0.1
    return q, k, v, torch.nn.functional.logsigmoid(rand(b, hkv, t, d)) / 16, None, rand(b, hkv, d, d) * 0.1


@pytest.mark.parametrize("delta", [False, True], ids=["gla", "gated_delta_rule"])
def test_fla_prefill_matches_the_recurrence_forward_and_backward(delta):
    q, k, v, g, beta, s0 = inputs(delta)
    extra = (beta,) if delta else ()
    fla = D.delta_rule_fla if delta else G.gla_fla
    reference = D.delta_rule_recurrent_reference if delta else G.gla_recurrent_reference
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, state = fla(*leaves, g, *extra, s0)
    ref_leaves = [x.double().clone().requires_grad_() for x in (q, k, v)]
    o_ref, state_ref = reference(*ref_leaves, g.double(), *[e.double() for e in extra], s0.double())
    # fla's float32 dots may run in TF32: tolerances of that precision (a wrong head layout or state is O(1) off)
    assert (o.double() - o_ref).abs().max().item() < 1e-2 * o_ref.abs().max().item()
    assert (state.double() - state_ref).abs().max().item() < 1e-2 * state_ref.abs().max().item()
    grad = torch.randn_like(o_ref)
    (o.double() * grad).sum().backward()
    (o_ref * grad).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert (got.grad.double() - want.grad).abs().max().item() < 2e-2 * want.grad.abs().max().item()

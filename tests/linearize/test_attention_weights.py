"""output_attentions on a model with linearized layers: every layer has its entry, in layer order (transformers drops a
None entry, which would shift the later layers'), and a linearized layer's weights are its real ones: its output is
linear in the values, o_t = sum_s A[t, s] v_s, which the test checks against what reaches o_proj."""
from __future__ import annotations

import io

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import compress
from compress.errors import CompressError

VARIANTS = {
    "gla": {"variant": "gla"},
    "hgrn2-normalized": {"variant": "gla", "gate": "hgrn2", "normalize": True},
    "gsa": {"variant": "gla", "gate": "gsa", "num_slots": 4},
    "hybrid": {"variant": "hybrid", "window": 4},
    "mom": {"variant": "mom", "num_memories": 3, "top_k": 2},
}


def eager_model(kv_heads: int):
    config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").double().eval()


def capture(model, layer: int):
    """Hooks keeping layer `layer`'s values (v_proj's output) and o_proj's input."""
    seen = {}
    attention = model.model.layers[layer].self_attn
    hooks = [attention.v_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("v", out)),
             attention.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o_in", a[0]))]
    return seen, hooks


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("name", VARIANTS)
def test_linearized_layers_return_the_weights_their_output_is_made_of(name, kv_heads):
    model = eager_model(kv_heads)
    compress.apply(model, [compress.get_pass("linearize")(layers=[0, 2], chunk_size=4, **VARIANTS[name])],
                   progress=False)
    ids = torch.randint(0, 128, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    seen, hooks = capture(model, 2)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    for h in hooks:
        h.remove()
    assert len(out.attentions) == 3  # layers 0 and 2 linearized, layer 1 softmax: each has its entry
    assert out.attentions[1].shape == (2, 4, 11, 11)
    weights = out.attentions[2]
    assert weights.shape == (2, 4, 11, 11)
    v = seen["v"].view(2, 11, kv_heads, 8).transpose(1, 2).repeat_interleave(4 // kv_heads, dim=1)
    v[1, :, :3] = 0.0  # (the padding's values, NaN in float64 after the softmax layer's all-masked rows, are unread)
    rebuilt = (weights @ v).transpose(1, 2).reshape(2, 11, 32)
    torch.testing.assert_close(rebuilt[0], seen["o_in"][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rebuilt[1, 3:], seen["o_in"][1, 3:], rtol=1e-9, atol=1e-9)
    assert weights[1, :, 3:, :3].abs().max() == 0  # padding is never attended
    assert weights[0].triu(1).abs().max() == 0 and weights[1, :, 3:].triu(1 + 3).abs().max() == 0  # causal
    # asked through the config instead of the call: the same entries
    model.config.output_attentions = True
    with torch.no_grad():
        assert [a.shape for a in model(ids, attention_mask=mask).attentions] == [w.shape for w in out.attentions]
    model.config.output_attentions = False
    # the logits are those of the same call without the weights
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, out.logits, rtol=1e-12, atol=1e-12,
                                   equal_nan=True)


def test_weights_over_tokens_folded_into_the_state_are_refused():
    model = eager_model(2)
    compress.apply(model, [compress.get_pass("linearize")(layers=[1])], progress=False)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    torch.save(model, io.BytesIO())  # no hook (a closure) of ours on the model: it pickles as the original does
    with torch.no_grad():
        with pytest.raises(CompressError, match="layer 1 is linearized.*no attention weights over them"):
            model(ids[:, -1:], cache=cache, output_attentions=True)
        # a fresh cache has no past: the weights are there, every layer's
        fresh = model(ids, cache=DynamicCache(config=model.config), output_attentions=True)
    assert [a.shape for a in fresh.attentions] == [(1, 4, 6, 6)] * 3

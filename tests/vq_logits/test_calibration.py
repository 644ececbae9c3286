"""vq_logits' calibration hidden states: the head's inputs, sampled as from the concatenation of every position, with
the head never run (its logits are the largest tensor of the forward at a real vocabulary)."""
from __future__ import annotations

import pytest
import torch

from compress.vq_logits.calibration import head_inputs


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return LlamaForCausalLM(config).eval()


def reference(model, batches, keep, seed, batch_size):
    """The old way: every batch's head input concatenated, then randperm rows."""
    captured = []
    hook = model.lm_head.register_forward_hook(lambda m, inp, out: captured.append(inp[0].reshape(-1, 32).float()))
    with torch.no_grad():
        for i in range(0, batches.shape[0], batch_size):
            model(input_ids=batches[i:i + batch_size], use_cache=False)
    hook.remove()
    hidden = torch.cat(captured)
    if hidden.shape[0] > keep:
        hidden = hidden[torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(seed))[:keep]]
    return hidden


@pytest.mark.parametrize("keep", [10, 100, 1000])
def test_the_sampled_rows_are_those_of_the_whole_concatenation(model, keep):
    batches = torch.randint(0, 96, (11, 20), generator=torch.Generator().manual_seed(1))
    head_calls = []
    hook = model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    try:
        with torch.no_grad():
            got = head_inputs(model, model.lm_head, batches, keep=keep, seed=3, batch_size=4)
    finally:
        hook.remove()
    assert head_calls == []  # the forward stopped at the head's input
    want = reference(model, batches, keep, seed=3, batch_size=4)
    assert got.shape == (min(keep, 220), 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_head_that_sees_fewer_positions_than_tokens_is_an_error(model):
    from compress.errors import CompressError

    class LastPositionOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.lm_head = inner, inner.lm_head

        def forward(self, input_ids, **kwargs):
            return self.lm_head(self.inner.model(input_ids).last_hidden_state[:, -1:])

    with pytest.raises(CompressError, match="received 4 positions for 80 tokens"):
        head_inputs(LastPositionOnly(model), model.lm_head, torch.zeros(4, 20, dtype=torch.long), keep=10, seed=0)

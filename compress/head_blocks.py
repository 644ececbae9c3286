"""The output head applied a block of positions at a time, from the decoder's final hidden states: the logits of
a whole window over a large vocabulary are the largest tensors of an evaluation or a training step (float32 logits
of 8 windows for a model and its baseline held ~10 bytes per position and vocabulary entry: 10.9 GB for one 8k
window at Llama-3's 128k vocabulary; a recovery step's loss held 3-7 float32 copies of its logits)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def has_head_and_decoder(model: nn.Module) -> bool:
    """Whether `model` names its decoder and output head (transformers' get_decoder / get_output_embeddings), which
    `final_hidden_states` hooks; a plain module around a model does not."""
    head, decoder = (getattr(model, name, lambda: None)() for name in ("get_output_embeddings", "get_decoder"))
    return isinstance(head, nn.Module) and isinstance(decoder, nn.Module) and decoder is not model


@contextlib.contextmanager
def final_hidden_states(model: nn.Module):
    """Within: each forward of `model` appends its decoder's final hidden states [B, T, d] to the yielded list,
    and its head computes the last position only: the caller applies the head a block of positions at a time.
    (`model` itself, or a wrapper that passes attribute lookups through: PEFT, DDP's `.module` is not.)"""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        captured.append(getattr(output, "last_hidden_state", None))

    def last_position_only(module, args):
        return (args[0][:, -1:], *args[1:]) if args and args[0].dim() == 3 else None

    hooks = [decoder.register_forward_hook(keep), head.register_forward_pre_hook(last_position_only)]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()

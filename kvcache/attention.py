"""The "gear_kv" attention implementation registered with transformers.

With a GEARCache, each layer's `update` hands attention the recent tokens tagged with a snapshot of the compressed
past (cache.tag_past); this function then computes attention from the compressed storage plus the recent tokens
with `compress.kernels.kv_attention.compressed_decode_attention` (Triton on CUDA, its torch reference elsewhere).
Any other call (no cache, a DynamicCache, a layer with nothing compressed yet) goes to transformers' sdpa, so the
implementation can stay set on a model whatever cache it is given. With output_attentions, the torch reference
computes the weights too (over the same dequantized past the kernels read), prompts included.
torch.compile runs it eagerly (a graph break): the kernels are C/Triton calls whose page layouts Dynamo cannot
trace."""
from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..attention_outputs import attentions_requested
from ..errors import CompressError
from ..kernels.kv_attention import compressed_attention_reference, compressed_decode_attention
from .cache import ATTENTION_NAME


@torch.compiler.disable
def gear_attention_forward(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    past_keys = getattr(key, "_gear_past", None)
    if attentions_requested(kwargs):  # sdpa returns none: transformers would drop every layer's entry
        out, weights = compressed_attention_reference(query, past_keys, getattr(value, "_gear_past", None), key,
                                                      value, attention_mask, scaling, return_weights=True)
        return out.transpose(1, 2).contiguous(), weights.to(query.dtype)
    if past_keys is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = compressed_decode_attention(query, past_keys, value._gear_past, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, gear_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_compressed_attention(model: nn.Module) -> nn.Module:
    """Make the model's attention read a GEARCache's compressed storage directly (other caches: sdpa)."""
    if not callable(getattr(model, "set_attn_implementation", None)):
        raise CompressError(f"use_compressed_attention takes a transformers model, got {type(model).__name__}")
    model.set_attn_implementation(ATTENTION_NAME)
    return model

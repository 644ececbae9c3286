"""Module swap: a decoder layer's softmax attention -> LinearizedAttention (same projections, no new parameters) or,
for variant mom, MixtureOfMemoriesAttention (same projections plus a small router and beta map)."""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..pass_api import replace_module
from .attention import LinearizedAttention
from .mom import MixtureOfMemoriesAttention, attention_class
from .settings import LayerSpec, LinearizeSettings, check_layer_spec, resolve_layers

ATTENTION_NAME = re.compile(r"(.*\.)?layers\.(\d+)\.self_attn$")


def attention_modules(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """{layer index: (dotted name, module)} of the decoder's attention modules."""
    found = {}
    for name, module in model.named_modules():
        m = ATTENTION_NAME.match(name)
        if m:
            found[int(m.group(2))] = (name, module)
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has no `layers.N.self_attn` modules: linearize supports "
                                    "transformers causal LMs of the Llama, Mistral, Qwen2 and Qwen3 families")
    return found


def linearize_model(model: nn.Module, settings: LinearizeSettings, layers: LayerSpec = "all", *,
                    strict: bool = True) -> list[str]:
    """Replace the chosen layers' attention in place; returns the names of the replaced modules. `strict=False`
    (loading a checkpoint) takes layer choices older versions recorded (see resolve_layers)."""
    try:
        check_layer_spec(layers)
    except ValueError as exc:
        raise ConfigError(f"linearize: {exc}") from None
    modules = attention_modules(model)
    chosen = resolve_layers(layers, len(modules), strict)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embedding, "weight", None)
    embedding_dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None
    names = []
    for i in chosen:
        name, module = modules[i]
        if isinstance(module, LinearizedAttention):
            raise UnsupportedModelError(f"{name} is already linearized")
        new = attention_class(settings)(module, settings, i)
        if isinstance(new, MixtureOfMemoriesAttention) and embedding_dtype is not None:
            # its router and beta map take k_proj's dtype, which a bitsandbytes k_proj does not show (its only
            # float tensors are float32 statistics): the model's compute dtype, as its embedding holds it
            new.router.to(embedding_dtype), new.beta_proj.to(embedding_dtype)
        replace_module(model, name, new)
        names.append(name)
    return names

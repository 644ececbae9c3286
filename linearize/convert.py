"""Module swap: a decoder layer's softmax attention -> LinearizedAttention (same projections, no new parameters) or,
for variant mom, MixtureOfMemoriesAttention (same projections plus a small router and beta map)."""
from __future__ import annotations

import re

from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..pass_api import replace_module
from .attention import LinearizedAttention
from .mom import attention_class
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


def linearize_model(model: nn.Module, settings: LinearizeSettings, layers: LayerSpec = "all") -> list[str]:
    """Replace the chosen layers' attention in place; returns the names of the replaced modules."""
    try:
        check_layer_spec(layers)
    except ValueError as exc:
        raise ConfigError(f"linearize: {exc}") from None
    modules = attention_modules(model)
    chosen = resolve_layers(layers, len(modules))
    names = []
    for i in chosen:
        name, module = modules[i]
        if isinstance(module, LinearizedAttention):
            raise UnsupportedModelError(f"{name} is already linearized")
        replace_module(model, name, attention_class(settings)(module, settings, i))
        names.append(name)
    return names

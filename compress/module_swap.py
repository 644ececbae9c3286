"""Swapping modules inside a model: a pass's compressed module put in place of the one it replaces, and the output
head untied from the input embedding before a pass compresses it (re-exported by pass_api, where passes find them)."""
from __future__ import annotations

import torch
from torch import nn


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted `name` inside `root` (how passes swap in their compressed modules), in the train/eval
    mode of the module it replaces, frozen where that one was (a new module came in train mode with trainable
    parameters inside an eval, frozen model), with no gradient left from the pass's own fitting."""
    parent, _, child = name.rpartition(".")
    holder = root.get_submodule(parent) if parent else root
    old = getattr(holder, child, None)
    if isinstance(old, nn.Module):
        new.train(old.training)
        params = [q for q in old.parameters() if q.is_floating_point()]
        if params and not any(q.requires_grad for q in params):
            new.requires_grad_(False)
    for q in new.parameters():
        q.grad = None
    setattr(holder, child, new)


UNTIED_NOTE = ("the output head shared its weight with the input embedding (tie_word_embeddings): it was untied "
               "first, the embedding kept as it was, so the model holds one more head than before")


def head_shares_embedding(model: nn.Module) -> bool:
    """Whether the output head's weight is the input embedding's (tie_word_embeddings), the same Parameter or the
    same memory (meta tensors all sit at address 0: only the same Parameter counts there)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    a, b = getattr(head, "weight", None), getattr(embedding, "weight", None)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    return a is b or (a.device.type != "meta" and a.data_ptr() == b.data_ptr() and a.shape == b.shape)


def untie_output_head(model: nn.Module, targets: dict[str, nn.Module]) -> bool:
    """Give the output head its own weight when a pass is about to compress it while it shares that weight with the
    input embedding: pruning in place would zero the embedding too, and a quantized head in a config that still says
    tied is tied back over the embedding at load (an unloadable checkpoint). True when it untied."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not any(m is head for m in targets.values()) or not head_shares_embedding(model):
        return False
    weight = head.weight
    head.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    from .models import text_config

    for config in {id(c): c for c in (model.config, text_config(model.config))}.values():
        config.tie_word_embeddings = False
    return True

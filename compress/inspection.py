"""Bytes per component of a model or checkpoint: embeddings, attention, MLP, head, norms; dense vs compressed.

Counts bytes actually held by tensors (each storage once), so a packed module counts its codes and indices, not
the dense matrix it stands for."""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

COMPONENTS = (
    ("embeddings", re.compile(r"(^|\.)(embed_tokens|wte|wpe)(\.|$)")),
    ("head", re.compile(r"(^|\.)lm_head(\.|$)")),
    ("attention", re.compile(r"(^|\.)(self_attn|attn|attention)(\.|$)")),
    ("mlp", re.compile(r"(^|\.)(mlp|feed_forward)(\.|$)")),
    ("norms", re.compile(r"norm")),
)


def component_of(name: str) -> str:
    for comp, rx in COMPONENTS:
        if rx.search(name):
            return comp
    return "other"


def _is_compressed(module: nn.Module) -> bool:
    """Modules from torch or transformers hold dense tensors; the project's own modules hold compressed forms."""
    return not type(module).__module__.startswith(("torch.", "transformers."))


def owner_module(modules: dict[str, nn.Module], tensor_name: str) -> nn.Module:
    """The module a state-dict entry belongs to (bitsandbytes layouts name tensors like `proj.weight.absmax`)."""
    name = tensor_name.rpartition(".")[0]
    while name not in modules:
        name = name.rpartition(".")[0]
    return modules[name]


def derived_tensor_names(model: nn.Module) -> set[str]:
    """State-dict names a checkpoint leaves out because their module rebuilds them on load from tensors it does
    store (a module's `derived_tensors()`: an activation-sparse MLP's gate weight, its int8/int4 codes expanded)."""
    out = set()
    for name, module in model.named_modules():
        derived = getattr(module, "derived_tensors", None)
        if callable(derived):
            out.update(f"{name}.{t}" if name else t for t in derived())
    return out


def rebuild_derived(model: nn.Module) -> None:
    """After a load: each module rebuilds the tensors its checkpoint left out (`derived_tensor_names`)."""
    for module in model.modules():
        if callable(getattr(module, "derived_tensors", None)) and module.derived_tensors():
            module.rebuild_derived()


def bytes_by_component(model: nn.Module, storage_dtype: torch.dtype | None = None,
                       headers: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> dict[str, dict[str, int]]:
    """{component: {"dense": bytes, "compressed": bytes}} over the tensors a checkpoint stores (the state dict:
    non-persistent buffers such as rotary frequencies and `derived_tensor_names` are rebuilt on load, not stored).
    A tensor counts as compressed when its owning module is the project's own (e.g. a SparseLinear or a VQ head).
    With `storage_dtype`, floating tensors are counted at that dtype's size (what the checkpoint holds).
    `headers` ({name: (safetensors dtype, shape)}, a checkpoint's): a tensor found there counts at its stored
    dtype instead (a folder need not hold the dtype its config names, nor one dtype for all its tensors); with the
    shape the model gives it, so a plain model of the same architecture counts as that file would store it."""
    from .checkpoint_validation import FLOATING, ITEM_SIZES

    out: dict[str, dict[str, int]] = defaultdict(lambda: {"dense": 0, "compressed": 0})
    modules = dict(model.named_modules())
    groups: dict[object, list[str]] = {}  # tied weights: stored once, under one of their names
    tensors, derived = {}, derived_tensor_names(model)  # derived: rebuilt on load, not stored
    for name, t in model.state_dict(keep_vars=True).items():
        if name in derived:
            continue
        key = id(t) if t.device.type == "meta" else (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
        groups.setdefault(key, []).append(name)
        tensors.setdefault(key, t)
    for key, names in groups.items():
        name, t = names[0], tensors[key]
        owner = owner_module(modules, name)
        kind = "compressed" if _is_compressed(owner) else "dense"
        stored = next((headers[n][0] for n in names if n in headers), None) if headers else None
        if stored is not None and (stored in FLOATING) == t.is_floating_point():
            itemsize = ITEM_SIZES[stored]
        else:
            # an unmerged LoRA adapter is saved in its own dtype (recover/adapter.py), not the checkpoint's, and
            # so is a module's state it keeps float32 (bitsandbytes' scales: `kept_float32`)
            own_dtype = (".lora_A." in name or ".lora_B." in name
                         or name.rpartition(".")[2] in getattr(owner, "kept_float32", ()))
            itemsize = (torch.empty((), dtype=storage_dtype).element_size()
                        if storage_dtype is not None and t.is_floating_point() and not own_dtype
                        else t.element_size())
        out[component_of(name)][kind] += t.numel() * itemsize
    return dict(out)


def stored_bytes(model: nn.Module, storage_dtype: torch.dtype | None = None) -> int:
    """Bytes of the tensors a checkpoint of `model` stores (floating ones at `storage_dtype`)."""
    return sum(v["dense"] + v["compressed"] for v in bytes_by_component(model, storage_dtype).values())


# tensor names compressed-tensors gives a compressed layer (pack-/int-quantized, sparse bitmask / 2:4)
CT_TENSORS = re.compile(r"\.(weight_packed|weight_scale|weight_zero_point|weight_shape|weight_g_idx|bitmask|shape|"
                        r"compressed|row_offsets|meta)$")


def bytes_by_component_from_headers(headers: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, dict[str, int]]:
    """The same counts from a checkpoint's safetensors headers, for a folder whose layers transformers builds
    (compressed-tensors): a tensor counts as compressed when its module stores compressed-tensors' tensors."""
    from .checkpoint_validation import header_nbytes

    compressed_modules = {name.rpartition(".")[0] for name in headers if CT_TENSORS.search(name)}
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"dense": 0, "compressed": 0})
    for name, (dtype, shape) in headers.items():
        kind = "compressed" if name.rpartition(".")[0] in compressed_modules else "dense"
        out[component_of(name)][kind] += header_nbytes(dtype, shape)
    return dict(out)

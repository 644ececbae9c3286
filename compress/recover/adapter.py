"""An unmerged LoRA adapter on disk: a standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors,
keys `base_model.model.<module>.lora_A.weight`) beside the checkpoint, whose main weights keep the base layers'
usual names. On dense layers the folder also loads with plain PEFT (`PeftModel.from_pretrained(base, folder)`)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from .lora import ADAPTER, wrap_for_lora

WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _owner(key: str, modules: list[str]) -> str | None:
    for name in modules:
        if key.startswith(name + "."):
            return name
    return None


def save_adapter(model: nn.Module, state: dict[str, torch.Tensor], modules: list[str], lora_config,
                 path: Path) -> dict[str, torch.Tensor]:
    """Write the adapter folder at `path`; return `state` (the main weights) without the adapter's tensors and with
    `<module>.base_layer.x` renamed `<module>.x`."""
    main = {}
    for key, t in state.items():
        owner = _owner(key, modules)
        rest = key[len(owner) + 1:] if owner else ""
        if owner is None:
            main[key] = t
        elif rest.startswith("base_layer."):
            main[f"{owner}.{rest.removeprefix('base_layer.')}"] = t
        elif not rest.startswith(("lora_A.", "lora_B.")):
            main[key] = t
    # adapter tensors in their own dtype (fp32 when trained on the CPU): small, and reloaded exactly
    adapter = {}
    for name in modules:
        layer = model.get_submodule(name)
        for kind in ("lora_A", "lora_B"):
            adapter[f"{PEFT_PREFIX}{name}.{kind}.weight"] = getattr(layer, kind)[ADAPTER].weight.detach().cpu().contiguous()
    path.mkdir(parents=True)
    lora_config.save_pretrained(str(path))
    save_file(adapter, str(path / WEIGHTS), metadata={"format": "pt"})
    return main


@torch.no_grad()
def load_adapter(model: nn.Module, modules: list[str], lora_config, path: Path) -> None:
    """Wrap `modules` with LoRA layers and load the adapter folder's weights into them."""
    if not (path / WEIGHTS).exists():
        raise CheckpointError(f"{path} has no {WEIGHTS}")
    stored = load_file(str(path / WEIGHTS))
    for name in modules:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the adapter in {path} targets {name}, which this model does not have") from None
    wrap_for_lora(model, modules, lora_config)
    state = {}
    for key, t in stored.items():
        name, _, leaf = key.removeprefix(PEFT_PREFIX).rpartition(".")  # leaf is "weight"
        module, _, kind = name.rpartition(".")
        state[f"{module}.{kind}.{ADAPTER}.{leaf}"] = t
    expected = {f"{n}.{k}.{ADAPTER}.weight" for n in modules for k in ("lora_A", "lora_B")}
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        raise CheckpointError(f"{path} does not match its checkpoint: missing adapter tensors {missing or '-'}, "
                              f"unexpected {sorted(set(state) - expected)[:3] or '-'}")
    for key, t in state.items():  # the adapter keeps its saved dtype (fp32 when trained on the CPU), as in memory
        module = model.get_submodule(key.rpartition(".")[0])
        module.to(t.dtype)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"{path}: adapter tensors the model cannot take: {result.unexpected_keys[:3]}")
    model.requires_grad_(False)

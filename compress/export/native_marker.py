"""Native checkpoints that plain transformers cannot read refuse to load there, instead of loading with random layers.

A checkpoint whose stored tensors belong to this project's modules (packed 2:4 or bitmask layers, a codebook head,
quantized layers...) has no weights under the names a Hugging Face model expects: transformers would warn about
missing keys, initialize those layers randomly and generate nonsense. One whose modules compute differently with
the same tensors (linearized attention) would load without a warning as the original model. So `save` writes such a checkpoint with a
`model_type` transformers does not know (its error message then tells the user what to do) and keeps the real one
in `compress_model_type`; `compress.load` reads it back. vLLM and other tools read config.json through
transformers' AutoConfig and stop at the same message. Checkpoints without the marker load as before."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..errors import UnsupportedModelError

NATIVE_MODEL_TYPE = ("compress-native (packed layers: load this checkpoint with compress.load, or export it: "
                     "compress export CHECKPOINT -o OUT)")
# what a checkpoint gets when one of its passes has no compressed-tensors form (a codebook head, linearized layers..)
NATIVE_ONLY_MODEL_TYPE = "compress-native (layers only compress runs: load this checkpoint with compress.load)"
MARKERS = (NATIVE_MODEL_TYPE, NATIVE_ONLY_MODEL_TYPE,  # and the first wording, in checkpoints written before
           "compress-native (packed layers: load this checkpoint with compress.load, or export it with --format "
           "compressed-tensors)")
REAL_MODEL_TYPE_KEY = "compress_model_type"


def holds_project_tensors(model: nn.Module) -> bool:
    """Whether a stored tensor belongs to a module that is neither torch's nor transformers' (plain transformers
    could not put it anywhere)."""
    from ..inspection import _is_compressed, owner_module

    modules = dict(model.named_modules())
    owners = (owner_module(modules, name) for name in model.state_dict())
    # bitsandbytes layers are stored in the layout transformers' bitsandbytes integration reads
    return any(_is_compressed(m) and not getattr(m, "transformers_reads", False) for m in owners)


def runs_project_modules(model: nn.Module) -> bool:
    """Whether a module of this project computes part of the forward (a linearized attention holds the original
    projections under their usual names, so plain transformers would load it as softmax attention, silently)."""
    return any(type(m).__module__.startswith("compress.") and not getattr(m, "transformers_reads", False)
               for m in model.modules())


def exportable(config: dict) -> bool:
    """Whether every recorded pass has a compressed-tensors form (so the marker may suggest that export)."""
    from ..errors import ExportError
    from .compressed_tensors import check_passes

    passes = (config.get("compression") or {}).get("passes") or []
    try:
        check_passes([(p.get("pass"), p.get("args") or {}) for p in passes if isinstance(p, dict)])
    except ExportError:
        return False
    return True


def mark_native(config: dict, model: nn.Module) -> None:
    """Give a config.json dict the unknown model type when plain transformers could not read `model`'s tensors;
    its text (what transformers' error shows) suggests the compressed-tensors export only where that export works."""
    if holds_project_tensors(model) or runs_project_modules(model):
        config[REAL_MODEL_TYPE_KEY] = config["model_type"]
        config["model_type"] = NATIVE_MODEL_TYPE if exportable(config) else NATIVE_ONLY_MODEL_TYPE


def read_config(path: Path):
    """The transformers config of a model folder, marked (see above) or not."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if raw.get("model_type") not in MARKERS or REAL_MODEL_TYPE_KEY not in raw:
        return AutoConfig.from_pretrained(path)
    raw["model_type"] = raw.pop(REAL_MODEL_TYPE_KEY)
    if raw["model_type"] not in CONFIG_MAPPING:
        raise UnsupportedModelError(f"{path}: model type {raw['model_type']!r} is not known to this transformers")
    return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)

"""Loading models: the built-in reference model, a local Hugging Face folder, or a compressed checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, CompressError, UnsupportedModelError

BUILTIN_ROOT = Path(__file__).parent / "builtin"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model_path(source: str | Path) -> Path:
    """`builtin:NAME` -> the packaged folder; anything else must be a local folder with a config.json."""
    s = str(source)
    if s.startswith("builtin:"):
        name = s.split(":", 1)[1]
        path = BUILTIN_ROOT / name
        if not (path / "config.json").exists():
            known = sorted(p.name for p in BUILTIN_ROOT.iterdir() if (p / "config.json").exists()) if BUILTIN_ROOT.exists() else []
            raise CheckpointError(f"unknown built-in model {s!r}; available: {', '.join('builtin:' + k for k in known) or 'none'}")
        return path
    path = Path(s).expanduser()
    if not path.exists():
        raise CheckpointError(f"model {s} does not exist; give a local Hugging Face folder or builtin:tiny (no hub downloads)")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{s} has no config.json; give a Hugging Face model folder (config.json + *.safetensors)")
    return path


def read_config(path: Path):
    from .export.native_marker import read_config as read_marked_config

    config = read_marked_config(path)  # a native checkpoint's config.json hides its model type from transformers
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def compression_section(path: Path) -> dict[str, Any] | None:
    raw = json.loads((path / "config.json").read_text())
    return raw.get("compression")


def empty_model(config, dtype: torch.dtype | None = None, meta: bool = False) -> nn.Module:
    """The model structure from a config, with uninitialized (or meta) weights."""
    from transformers import AutoModelForCausalLM

    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def storage_dtype(config) -> torch.dtype:
    """The dtype the checkpoint stores floating tensors in (config.dtype; bf16 when absent)."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = DTYPES.get(d)
    return d if isinstance(d, torch.dtype) else torch.bfloat16


def load(
    source: str | Path,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str = "cpu",
    allow_pickle: bool = False,
    meta: bool = False,
) -> nn.Module:
    """Load a model for compression or inference.

    - `builtin:tiny`: the packaged reference model;
    - a compressed checkpoint (config.json with a `compression` section): compressed modules are rebuilt by each
      pass's `restore`, then the safetensors weights load strictly;
    - any other local Hugging Face folder: loaded from safetensors (a pickled `.bin` only with `allow_pickle`).

    `dtype` is the compute dtype (float32 by default: CPU kernels are fastest and most exact there); the storage
    dtype of the checkpoint is remembered in `model.config.dtype` so that `save` writes the same size back."""
    from .checkpoint import load_checkpoint, load_hf_folder

    _quiet_transformers()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CompressError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    path = resolve_model_path(source)
    config = read_config(path)
    stored_as = storage_dtype(config)  # before building: from_config/from_pretrained rewrite config.dtype
    section = compression_section(path)
    if section is not None:
        model = load_checkpoint(path, config, section, dtype=dtype, meta=meta)
    else:
        model = load_hf_folder(path, config, dtype=dtype, allow_pickle=allow_pickle, meta=meta)
    model.compress_source = str(source)
    model.compress_storage_dtype = stored_as
    if not meta:
        model.to(device)
    model.eval()
    return model


def checkpoint_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `save` writes this model's floating tensors in: the dtype it was loaded from."""
    return getattr(model, "compress_storage_dtype", None) or storage_dtype(model.config)


def _quiet_transformers() -> None:
    """Our own progress bars and messages replace transformers' per-load bars and info logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_tokenizer(source: str | Path):
    from transformers import AutoTokenizer

    path = resolve_model_path(source)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:  # a folder without tokenizer files: passes that need text will say so
        return None

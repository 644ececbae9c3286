"""The checkpoint format: safetensors weights, a `compression` section in config.json, the tokenizer, the recipe
and the report. Writes go to a temporary folder that is renamed into place, so an interrupted save leaves nothing
at the target. Loading never unpickles unless the caller passes `allow_pickle=True`."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError

FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def library_version() -> str:
    from . import __version__

    return __version__


def compression_record(passes: list[dict[str, Any]], recipe_text: str | None, calibration_hash: str | None,
                       source_model: str | None = None) -> dict:
    return {
        "source_model": source_model,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "passes": passes,
        "recipe_hash": hashlib.sha256(recipe_text.encode()).hexdigest()[:16] if recipe_text else None,
        "calibration_hash": calibration_hash,
    }


def _unique_state_dict(model: nn.Module, storage_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors kept once and floating tensors cast to the storage dtype."""
    out, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen and t.numel() > 0:
            continue  # a tied weight (e.g. lm_head = embed_tokens); re-tied on load
        seen[key] = name
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(storage_dtype)
        out[name] = t.contiguous()
    return out


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    return shards


def save(
    model: nn.Module,
    folder: str | Path,
    *,
    tokenizer=None,
    recipe_text: str | None = None,
    report: dict | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a checkpoint atomically. The `compression` section comes from `model.config.compression` (set by
    `compress.apply`); a model never compressed is saved with an empty pass list."""
    folder = Path(folder).expanduser()
    if folder.exists() and not overwrite:
        raise CheckpointError(f"{folder} already exists; choose another output folder or pass overwrite/--overwrite")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write(model, tmp, tokenizer, recipe_text, report, max_shard_bytes)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write(model, tmp: Path, tokenizer, recipe_text, report, max_shard_bytes) -> None:
    from .models import checkpoint_dtype

    dtype = checkpoint_dtype(model)
    state = _unique_state_dict(model, dtype)
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.setdefault("compression", compression_record([], recipe_text, None))
    config["architectures"] = [type(model).__name__]
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if recipe_text is not None:
        (tmp / "recipe.yaml").write_text(recipe_text)
    if report is not None:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))


def weight_files(path: Path) -> list[Path]:
    if (path / INDEX_NAME).exists():
        index = json.loads((path / INDEX_NAME).read_text())
        return sorted({path / f for f in index["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    return files


def read_state(path: Path) -> dict[str, torch.Tensor]:
    files = weight_files(path)
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights")
    state = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{path}: shard {f.name} named by the index is missing")
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                state[k] = sf.get_tensor(k)
    return state


def _no_init():
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def load_checkpoint(path: Path, config, section: dict, *, dtype, meta: bool = False) -> nn.Module:
    from .models import empty_model
    from .registry import get_pass

    version = section.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by compress format version {version} (library {section.get('library_version')}); "
            f"this library reads up to version {FORMAT_VERSION}: upgrade compress"
        )
    with _no_init():
        model = empty_model(config, dtype=dtype, meta=meta)
    for entry in section.get("passes", []):
        get_pass(entry["pass"])(entry.get("args", {})).restore(model, entry)
    if meta:
        return model
    state = read_state(path)
    expected = model.state_dict()
    tied = _tied_names(model)
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong[:3])}")
    if problems:
        raise CheckpointError(f"{path} does not match its config: " + " | ".join(problems))
    model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that alias an earlier tensor (saved once)."""
    seen, tied = set(), set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen and t.numel() > 0:
            tied.add(name)
        seen.add(key)
    return tied


def load_hf_folder(path: Path, config, *, dtype, allow_pickle: bool, meta: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from .models import empty_model

    if meta:
        return empty_model(config, dtype=dtype, meta=True)
    has_safetensors = bool(list(path.glob("*.safetensors")))
    if not has_safetensors:
        if not list(path.glob("*.bin")):
            raise CheckpointError(f"{path} has no weights (*.safetensors)")
        if not allow_pickle:
            raise CheckpointError(
                f"{path} has only pickled .bin weights, which can run code when loaded; convert them to safetensors, "
                "or pass --allow-pickle (allow_pickle=True) if you trust the file"
            )
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=has_safetensors)

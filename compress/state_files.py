"""Reading a native checkpoint's safetensors files: every tensor at once, or a decoder layer at a time (what `load`
does: the whole state dict read before it was copied in held about twice the weights at the peak)."""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, first_line

INDEX_NAME = "model.safetensors.index.json"
_LAYER_PREFIX = re.compile(r"^(.*?\.layers\.\d+)\.")


def weight_files(path: Path) -> list[Path]:
    if (path / INDEX_NAME).exists():
        from .checkpoint_validation import read_index

        return sorted({path / f for f in read_index(path / INDEX_NAME).values()})
    return sorted(path.glob("*.safetensors"))


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor; headers are checked first (checkpoint_validation), so a damaged file is a clear error."""
    from .checkpoint_validation import check_weight_files

    files = weight_files(path)
    check_weight_files(path, files)
    state: dict[str, torch.Tensor] = {}
    for group in read_state_by_layer(files):
        state.update(group)
    return state


def read_state_by_layer(files: list[Path]):
    """The tensors of `files` (headers checked already), one group at a time: a decoder layer's tensors together,
    from whichever shards hold them (a module that reads several of its keys at once sees them all), each other
    module's alone."""
    shard_of: dict[str, Path] = {}
    for f in files:
        with _readable(f), safe_open(f, framework="pt") as sf:
            shard_of.update(dict.fromkeys(sf.keys(), f))
    groups: dict[str, list[str]] = {}
    for key in shard_of:
        layer = _LAYER_PREFIX.match(key)
        groups.setdefault(layer.group(1) if layer else key.rpartition(".")[0], []).append(key)
    for keys in groups.values():
        state = {}
        for f in dict.fromkeys(shard_of[k] for k in keys):
            with _readable(f), safe_open(f, framework="pt") as sf:
                state.update({k: sf.get_tensor(k) for k in keys if shard_of[k] == f})
        yield state


@contextlib.contextmanager
def _readable(f: Path):
    """safetensors' errors past our header checks, as a damaged file's one line."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"{f}: cannot be read as safetensors ({first_line(exc)}); the file is damaged: copy "
                              "or export the model again") from None

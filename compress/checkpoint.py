"""The checkpoint format: safetensors weights, a `compression` section in config.json, the tokenizer, the recipe
and the report. Writes go to a temporary folder that is renamed into place, so an interrupted save leaves nothing
at the target. Loading never unpickles unless the caller passes `allow_pickle=True`."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from . import json_out
from .errors import CheckpointError, CompressError, disk_full_error, first_line
from .paths import user_path
from .state_files import INDEX_NAME, read_state, read_state_by_layer, weight_files  # noqa: F401 (callers')

FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
WEIGHTS_NAME = "model.safetensors"


def library_version() -> str:
    from . import __version__

    return __version__


def compression_record(passes: list[dict[str, Any]], recipe_text: str | None, calibration_hash: str | None,
                       source_model: str | None = None, calibration_sketch: dict | None = None) -> dict:
    return {
        "source_model": source_model,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "passes": passes,
        "recipe_hash": hashlib.sha256(recipe_text.encode()).hexdigest()[:16] if recipe_text else None,
        "calibration_hash": calibration_hash,
        **({"calibration_sketch": calibration_sketch} if calibration_sketch else {}),
    }


@torch.no_grad()
def round_to_storage(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every floating tensor the checkpoint stores to `dtype` in place, so the model in memory computes
    exactly what its checkpoint will (passes fit float32 weights on a model loaded from bf16: SparseGPT's updated
    rows, VQ-Logits' codebook, LoRA merges); a packed layer decoded for speed (SparseLinear runtime `dense`) is
    rounded in its dense copy, whose nonzeros are the values stored. Layers left on disk (max_memory) are not: they
    are read back from the offload folder at the compute dtype."""
    for name, module in model.named_modules():
        if any(part.startswith("lora_") for part in name.split(".")):
            continue  # an unmerged LoRA adapter is saved in its own dtype (recover/adapter.py)
        tensors = [t for t in module._parameters.values() if t is not None]
        tensors += [t for key, t in module._buffers.items()
                    if t is not None and key not in module._non_persistent_buffers_set]
        dense = getattr(module, "weight_dense", None) if getattr(module, "runtime", None) == "dense" else None
        tensors += [dense] if isinstance(dense, torch.Tensor) else []
        rounded = [t for t in tensors if t.is_floating_point() and t.dtype != dtype and t.device.type != "meta"]
        for t in rounded:
            t.data.copy_(t.data.to(dtype).to(t.dtype))
    # forms prepared from the tensors just rounded (in place, behind autograd's version counters) are rebuilt from
    # them: SparseLinear's GPU weights, bitsandbytes' quant state, an activation-sparse MLP's expanded gate
    for module in model.modules():
        rebuild = getattr(module, "after_storage_rounding", None)
        if callable(rebuild):
            rebuild()


def _unique_state_dict(model: nn.Module, storage_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors kept once, derived ones left out (inspection.derived_tensor_names) and
    floating tensors cast to the storage dtype."""
    from .inspection import derived_tensor_names

    out, seen, derived = {}, {}, derived_tensor_names(model)
    for name, t in model.state_dict().items():
        if name in derived:
            continue  # rebuilt on load from what the module stores
        if t.device.type == "meta":  # a layer left on disk (compress/offload.py): read when its shard is written
            from .offload import LazyTensor

            out[name] = LazyTensor.of(model, name, t, storage_dtype)
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen and t.numel() > 0:
            continue  # a tied weight (e.g. lm_head = embed_tokens); re-tied on load
        seen[key] = name
        t = t.detach()
        dtype = storage_dtype if t.is_floating_point() else t.dtype
        if t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous():
            out[name] = t  # written as it is
        else:  # converted when its shard is written: converted here, a float32 model held a bf16 copy of itself
            from .offload import LazyTensor

            out[name] = LazyTensor(t.shape, dtype, lambda t=t, dtype=dtype: t.to("cpu", dtype).contiguous())
    return out


def save(
    model: nn.Module,
    folder: str | Path,
    *,
    tokenizer=None,
    recipe_text: str | None = None,
    report: dict | Any | None = None,  # a dict, or the ApplyReport compress.apply returns
    overwrite: bool = False,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    format: str | None = None,
) -> Path:
    """Write a checkpoint atomically. The `compression` section comes from `model.config.compression` (set by
    `compress.apply`); a model never compressed is saved with an empty pass list. `format`: "native" (compress.load
    reads it) or "compressed-tensors" (transformers reads it, and vLLM unless quantized asymmetric; what compress
    export writes); by default the format of the recipe compress.apply ran (`export: {format: ...}`, which was
    dropped here), else native."""
    from .models import unwrapped

    if not isinstance(overwrite, bool):  # "no" from a config file is truthy: never replace a folder on a guess
        raise CompressError(f"overwrite must be True or False, got {overwrite!r}")
    model = unwrapped(model, "save()")
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise CompressError(f"save() takes a model from compress.load / compress.apply, got {type(model).__name__}")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise CompressError(f"tokenizer= takes a tokenizer (compress.load_tokenizer(...)), got {tokenizer!r:.80}")
    if recipe_text is not None and not isinstance(recipe_text, str):
        raise CompressError(f"recipe_text= takes the recipe's YAML text (a str), got {type(recipe_text).__name__}")
    if not isinstance(folder, (str, os.PathLike)):
        raise CompressError(f"save() takes the output folder as a path, got {folder!r:.80}")
    if hasattr(report, "to_dict"):  # the ApplyReport compress.apply returns (its repr went into report.json)
        report = report.to_dict()
    if report is not None and not isinstance(report, dict):
        raise CompressError(f"report= takes the report compress.apply returns (or a dict), got {type(report).__name__}")
    from .offload import parse_bytes

    max_shard_bytes = parse_bytes(max_shard_bytes, "max_shard_bytes")  # "2GB" too, as max_memory takes
    format = format if format is not None else getattr(model, "compress_export_format", None) or "native"
    if format == "compressed-tensors":
        from .export.compressed_tensors import export

        export(model, folder, tokenizer=tokenizer, recipe_text=recipe_text, report=report, overwrite=overwrite,
               max_shard_bytes=max_shard_bytes)
        return Path(folder)
    if format != "native":
        raise CompressError(f"format= takes 'native' or 'compressed-tensors', got {format!r:.80}")
    return write_folder(folder, lambda tmp: _write(model, tmp, tokenizer, recipe_text, report, max_shard_bytes),
                        overwrite=overwrite, source=_source_folder(model))


def write_folder(folder: str | Path, write, *, overwrite: bool, source: Path | None) -> Path:
    """Check the output, run `write(tmp)` on a temporary folder beside it, then swap that into place: an
    interrupted write leaves nothing at `folder` (every export format goes through here)."""
    from .output_folder import check_output, swap_into_place, temporary_folder, write_manifest

    folder = check_output(folder, overwrite=overwrite, source=source)
    target = folder.resolve()  # `new/../ckpt` makes no `new/`
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(target)
    try:
        write(tmp)
        write_manifest(tmp)  # last: the files --overwrite may replace are exactly these (every format)
        swap_into_place(tmp, target, overwrite=overwrite)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(exc, folder)
        if full is not None:  # the user's disk, not a bug: one line (errors.user_error) instead of a traceback
            raise full from None
        raise
    return folder


def _source_folder(model: nn.Module) -> Path | None:
    source = getattr(model, "compress_source", None)
    if not source or str(source).startswith("builtin:"):
        return None
    return user_path(source)


def _portable_source(section: dict, tmp: Path) -> dict:
    """`source_model` as a path relative to the checkpoint folder (`tmp` is its sibling, so the same relative path),
    so that `compress eval` finds the baseline from any working directory and after both folders move together."""
    source = section.get("source_model")
    if not source or str(source).startswith("builtin:") or not Path(source).is_absolute():
        return section
    return {**section, "source_model": os.path.relpath(source, tmp)}


def _write(model, tmp: Path, tokenizer, recipe_text, report, max_shard_bytes) -> None:
    from .export.native_marker import mark_native
    from .models import checkpoint_dtype

    dtype = checkpoint_dtype(model)
    state = _unique_state_dict(model, dtype)
    for entry, p in _recorded_passes(model):
        state = p.write_files(model, entry, state, tmp)  # e.g. an unmerged LoRA adapter's own folder
    write_weights(state, tmp, max_shard_bytes)
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.setdefault("compression", compression_record([], recipe_text, None))
    config["compression"] = {**_portable_source(config["compression"], tmp),
                             "passes": [p.entry_as_held(model, entry) for entry, p in _recorded_passes(model)]}
    config["architectures"] = [type(model).__name__]
    mark_native(config, model)  # plain transformers must refuse what it cannot read (export/native_marker.py)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    write_companions(model, tmp, tokenizer, recipe_text, report)


def write_companions(model, folder: Path, tokenizer, recipe_text: str | None, report: dict | None) -> None:
    """What travels beside the weights and config.json in every format: generation config, tokenizer, the recipe
    and the run's report."""
    write_generation_config(model, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if recipe_text is not None:
        (folder / "recipe.yaml").write_text(recipe_text)
    if report is not None:
        (folder / "report.json").write_text(json_out.dumps(report, indent=2))


def write_generation_config(model, folder: Path) -> None:
    """generation_config.json, as `save_pretrained` writes it: the source model's end-of-sequence ids (Llama-3
    Instruct stops at <|eot_id|> only through this file) and sampling defaults travel with the checkpoint."""
    generation_config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation_config is None or not (callable(can_generate) and can_generate()):
        return
    try:
        generation_config.save_pretrained(folder)
    except ValueError as exc:  # a generation config changed into an invalid one: transformers refuses to save it
        raise CompressError(f"model.generation_config cannot be saved: {first_line(str(exc))}") from None


def write_weights(state, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """model.safetensors, or shards and their index above `max_shard_bytes` (the layout transformers reads).
    `state`: a dict, or (name, tensor) pairs made as they are consumed (an export computes a layer's tensors when
    its shard is reached). Either way one shard is in memory at a time: LazyTensors are read as they are added, and a
    shard is written once the next tensor would take it past the limit (under a temporary name, renamed once the
    number of shards is known)."""
    from .offload import LazyTensor

    items = state.items() if isinstance(state, Mapping) else state
    parts: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        part = folder / f"shard-{len(parts) + 1:05d}.partial"
        save_file(current, part, metadata={"format": "pt"})
        parts.append((part, list(current)))

    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current[name] = t.load() if isinstance(t, LazyTensor) else t
        size, total = size + nbytes, total + nbytes
    if not parts:
        save_file(current, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        return
    flush()
    weight_map = {}
    for i, (part, names) in enumerate(parts, 1):
        shard = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        part.rename(folder / shard)
        weight_map.update(dict.fromkeys(names, shard))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def _no_init():
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def check_format_version(path: Path, section: dict) -> None:
    version = section.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CheckpointError(f"{path}: config.json's compression.format_version is {version!r}, not an integer "
                              ">= 0: the file was edited or damaged")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by compress format version {version} (library {section.get('library_version')}); "
            f"this library reads up to version {FORMAT_VERSION}: upgrade compress"
        )


def load_checkpoint(path: Path, config, section: dict, *, dtype, meta: bool = False) -> nn.Module:
    from .checkpoint_validation import check_against_model, check_loaded_modules, check_weight_files
    from .inspection import rebuild_derived
    from .models import empty_model
    from .registry import get_pass

    check_format_version(path, section)

    def structure(on_meta: bool) -> nn.Module:
        with _no_init():
            model = empty_model(config, dtype=dtype, meta=on_meta)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()  # from_config under no_init leaves the head untied; the checkpoint stores it once
        for i, entry in enumerate(section.get("passes", [])):
            restore_pass(path, i, entry, model)
        return model

    if meta:
        return structure(True)
    # the files against the structure on meta first: a hand-edited record's sizes would be allocated otherwise
    files = weight_files(path)
    headers = check_weight_files(path, files)
    probe = structure(True)
    check_against_model(path, headers, probe, _tied_names(probe))
    del probe
    model = structure(False)
    for state in read_state_by_layer(files):  # (one layer's tensors beside the model: the whole state dict
        try:                                        # read first held ~2x the weights at the peak)
            model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a module's own check of its tensors (e.g. a bitsandbytes quant state)
            reasons = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
            if not reasons or "Error(s) in loading state_dict" not in str(exc):
                raise
            raise CheckpointError(f"{path}: {reasons[0]}" + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1
                                                             else "")) from None
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    rebuild_derived(model)
    check_loaded_modules(path, model)
    for entry in section.get("passes", []):
        get_pass(entry["pass"]).from_record(entry.get("args") or {}).read_files(model, entry, path)
    return model


def _recorded_passes(model: nn.Module):
    """(entry, pass instance) for each pass the model's `compression` section records."""
    from .registry import get_pass

    for entry in (getattr(model.config, "compression", None) or {}).get("passes", []):
        yield entry, get_pass(entry["pass"]).from_record(entry.get("args") or {})


def restore_pass(path: Path, index: int, entry: dict, model: nn.Module) -> None:
    """Rebuild one pass's modules from its checkpoint entry; a record the pass cannot read is a damaged checkpoint."""
    from .errors import CompressError
    from .registry import get_pass

    name = entry["pass"]
    try:
        get_pass(name).from_record(entry.get("args") or {}).restore(model, entry)
    except CheckpointError:
        raise
    except CompressError as exc:
        raise CheckpointError(f"{path}: compression.passes[{index}] ({name}): {first_line(exc)}") from None
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, ArithmeticError) as exc:  # negative sizes..
        if isinstance(exc, RuntimeError) and ("allocate" in str(exc) or isinstance(exc, torch.OutOfMemoryError)):
            raise  # out of memory: not the checkpoint's fault
        raise CheckpointError(f"{path}: compression.passes[{index}] ({name}) has a damaged restore record "
                              f"({type(exc).__name__}: {exc}); export the checkpoint again") from None


def extra_folders(path: Path, section: dict | None) -> list[Path]:
    """The subfolders the checkpoint's passes wrote beside its weights (Pass.extra_folders), e.g. `adapter/`."""
    return list(extra_folder_files(path, section))


def folder_bytes(path: Path) -> int:
    """Bytes of the weight files: the safetensors (with those of subfolders its passes wrote, e.g. an unmerged
    adapter), or where there are none the pickled .bin a model loaded with --allow-pickle reads (a folder with both
    loads the safetensors; training_args.bin and the like are no weights)."""
    from .models import compression_section

    path = Path(path)
    files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
    for folder in extra_folders(path, compression_section(path) if (path / "config.json").exists() else None):
        files += list(folder.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


def extra_folder_files(path: Path, section: dict | None) -> dict[Path, tuple[str, ...]]:
    """Those subfolders, each with the file names its pass writes there (Pass.extra_folder_files)."""
    from .registry import get_pass

    out = {}
    for entry in (section or {}).get("passes", []):
        try:
            p = get_pass(entry["pass"]).from_record(entry.get("args") or {})
        except CompressError:  # an entry this version cannot read: load reports it
            continue
        for name in p.extra_folders(entry):  # a malformed record: CheckpointError
            out[path / name] = tuple(dict.fromkeys(out.get(path / name, ()) + tuple(p.extra_folder_files)))
    return out


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that alias an earlier tensor (saved once)."""
    seen, tied = set(), set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # the same Parameter under two names (works on meta tensors too)
            tied.add(name)
        seen.add(id(t))
    return tied


def verify_files(path: Path, model: nn.Module) -> None:
    """Check a checkpoint's weight files against a (meta) model without reading the tensors (for `inspect`)."""
    from .checkpoint_validation import check_against_model, check_weight_files

    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # a plain folder built on the meta device: the head is stored once, as the embedding
    check_against_model(path, check_weight_files(path, weight_files(path)), model, _tied_names(model))


def load_hf_folder(path: Path, config, *, dtype, allow_pickle: bool, meta: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from .models import empty_model

    if meta:
        return empty_model(config, dtype=dtype, meta=True)
    has_safetensors = bool(list(path.glob("*.safetensors")))
    headers = {}
    if has_safetensors:
        from .checkpoint_validation import check_weight_files

        headers = check_weight_files(path, weight_files(path))
    else:
        if not list(path.glob("*.bin")):
            raise CheckpointError(f"{path} has no weights (*.safetensors)")
        if not allow_pickle:
            raise CheckpointError(
                f"{path} has only pickled .bin weights, which can run code when loaded; convert them to safetensors, "
                "or pass --allow-pickle (allow_pickle=True) if you trust the file"
            )
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own progress output; transformers' warnings stay on (its verbosity is
    try:                               # the user's to set)
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=has_safetensors,
                                                           output_loading_info=True)
    except RuntimeError as exc:  # transformers refuses stored shapes that differ from the config's
        text = str(exc)
        if "ignore_mismatched_sizes" not in text and "size mismatch" not in text:
            raise
        raise CheckpointError(f"{path} does not match its config.json: stored tensors of other shapes (transformers' "
                              "report above names them); fix config.json or the weights") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    # transformers fills missing tensors with random values and drops unexpected ones (after its own ignore lists,
    # e.g. legacy rotary buffers), with a warning: a model that is not the checkpoint must not be compressed
    problems = []
    for key, what in (("missing_keys", "missing tensors"), ("unexpected_keys", "unexpected tensors"),
                      ("mismatched_keys", "wrong shapes")):
        names = sorted(str(k) for k in info.get(key) or ())
        if names:
            problems.append(f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}")
    # integers for floats (or the reverse) cast silently; a Hugging Face folder's integer widths are its loader's
    from .checkpoint_validation import dtype_mismatches

    kinds = dtype_mismatches(headers, model.state_dict(), exact_integers=False, stored="stored")
    if kinds:
        problems.append(f"wrong dtypes: {'; '.join(kinds[:3])}")
    if problems:
        raise CheckpointError(f"{path} does not match its config.json: " + " | ".join(problems))
    return model

"""Loading models: the built-in reference model, a local Hugging Face folder, or a compressed checkpoint."""
from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .environment import check_environment, setting
from .errors import CheckpointError, CompressError, UnsupportedModelError, first_line
from .heap import release_freed_heap
from .paths import user_path

BUILTIN_ROOT = Path(__file__).parent / "builtin"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model_path(source: str | Path) -> Path:
    """`builtin:NAME` -> the packaged folder; anything else must be a local folder with a config.json."""
    s = str(source)
    if not s.strip():
        raise CheckpointError("no model given (an empty path); give a local Hugging Face folder or builtin:tiny")
    if s.startswith("builtin:"):
        name = s.split(":", 1)[1]
        path = BUILTIN_ROOT / name
        if not (path / "config.json").exists():
            known = sorted(p.name for p in BUILTIN_ROOT.iterdir() if (p / "config.json").exists()) if BUILTIN_ROOT.exists() else []
            raise CheckpointError(f"unknown built-in model {s!r}; available: {', '.join('builtin:' + k for k in known) or 'none'}")
        return path
    path = user_path(s)
    if not path.exists():
        from .output_folder import recover, wait_for_swap

        recover(path.absolute())  # a save interrupted between its two renames left the old copy beside it
        wait_for_swap(path.absolute())  # another process's save between its two renames
    if not path.exists():
        raise CheckpointError(f"model {s} does not exist; give a local Hugging Face folder or builtin:tiny (no hub downloads)")
    if path.is_file():
        raise CheckpointError(f"{s} is a file; give the model's folder ({path.parent} if this file is in it)")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{s} has no config.json; give a Hugging Face model folder (config.json + *.safetensors)")
    return path


def read_config(path: Path):
    from .checkpoint_validation import read_config_json
    from .export.native_marker import read_config as read_marked_config

    read_config_json(path)  # a damaged config.json is a one-line CheckpointError, not transformers' traceback
    try:
        # a native checkpoint's config.json hides its model type from transformers
        config = read_marked_config(path)
    except CompressError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' config classes raise many kinds (strict dataclasses too)
        raise CheckpointError(f"{path / 'config.json'}: transformers cannot read it "
                              f"({first_line(exc)})") from None
    stored = getattr(config, "dtype", None)
    stored = getattr(torch, stored, stored) if isinstance(stored, str) else stored
    if stored is not None and not (isinstance(stored, torch.dtype) and stored.is_floating_point):
        raise CheckpointError(f"{path / 'config.json'}: dtype {str(stored).removeprefix('torch.')!r} is not a "
                              "floating-point type (float32, bfloat16 or float16)")
    text = text_config(config)
    for key in ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers"):
        value = getattr(text, key, None)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise CheckpointError(f"{path / 'config.json'}: {key} is {value!r}; it must be a positive integer")
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def compression_section(path: Path) -> dict[str, Any] | None:
    from .checkpoint_validation import check_compression_section, read_config_json

    return check_compression_section(path, read_config_json(path).get("compression"))


def empty_model(config, dtype: torch.dtype | None = None, meta: bool = False) -> nn.Module:
    """The model structure from a config, with uninitialized (or meta) weights."""
    from transformers import AutoModelForCausalLM

    try:
        if meta:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config, dtype=dtype)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, ArithmeticError) as exc:
        # values the config's class accepts but the modeling code cannot use (an unknown activation or RoPE type,
        # zero heads): transformers raises from deep inside its modules
        detail = first_line(exc)
        raise CheckpointError(f"config.json: transformers cannot build a {getattr(config, 'model_type', '?')} model "
                              f"from it ({type(exc).__name__}: {detail}); the config is damaged or edited") from None


def storage_dtype(config, folder: Path | None = None) -> torch.dtype:
    """The dtype the checkpoint stores floating tensors in: the dtype of most floating elements in the folder's
    safetensors headers (what its files hold: a bf16 folder whose config says float32 was saved back at twice its
    size); else config.dtype; bf16 when neither says."""
    found = _headers_float_dtype(folder) if folder is not None else None
    return found or _config_dtype(config) or torch.bfloat16


def _config_dtype(config) -> torch.dtype | None:
    # an older config's own torch_dtype field, not transformers 5's deprecated alias (which warns on every read)
    d = getattr(config, "dtype", None) or getattr(config, "__dict__", {}).get("torch_dtype")
    if isinstance(d, str):
        d = DTYPES.get(d)
    return d if isinstance(d, torch.dtype) else None


def _headers_float_dtype(folder: Path) -> torch.dtype | None:
    from .checkpoint import weight_files
    from .checkpoint_validation import headers_float_dtype, read_header

    headers = {}
    try:
        for file in weight_files(folder):
            headers.update({f"{file.name}/{k}": v for k, v in read_header(file).items()})
    except CompressError:  # a damaged file (or none: a pickled .bin): reading the weights reports it
        return None
    return headers_float_dtype(headers)


def load(
    source: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
    allow_pickle: bool = False,
    meta: bool = False,
    sparse_runtime: str = "auto",
    max_memory: int | str | None = None,
    offload_folder: str | Path | None = None,
) -> nn.Module:
    """Load a model for compression or inference.

    - `builtin:tiny`: the packaged reference model;
    - a compressed checkpoint (config.json with a `compression` section): compressed modules are rebuilt by each
      pass's `restore`, then the safetensors weights load strictly;
    - any other local Hugging Face folder: loaded from safetensors (a pickled `.bin` only with `allow_pickle`).

    `dtype`: "auto" (default) keeps the checkpoint's dtype where the device computes it natively (CUDA, CPUs with
    AVX512-BF16/AMX) and uses float32 on CPUs that emulate half precision (there bf16 matmuls are ~10x slower);
    "stored" always keeps the checkpoint's dtype (least memory); or float32 / bfloat16 / float16. The storage
    dtype is remembered so that `save` writes the same size back.
    `sparse_runtime` is how pruned layers run (compress/prune/runtime.py): `auto` (packed kernels on CUDA and for
    large float32 layers on the CPU, dense for the others), `dense` (decoded once at load: dense speed) or `packed`
    (smallest memory).
    `max_memory` (e.g. "8GB") caps the CPU memory the weights take: decoder layers that do not fit stay on disk and
    are read one at a time (compress/offload.py); `offload_folder` holds the compressed layers written meanwhile
    (a temporary folder by default)."""
    from .prune.runtime import resolve_runtime, set_sparse_runtime

    check_environment()
    resolve_runtime(sparse_runtime, "cpu")  # an unknown runtime fails before anything loads
    if not isinstance(allow_pickle, bool):  # "false" from a config file is truthy: never unpickle on a guess
        raise CompressError(f"allow_pickle must be True or False, got {allow_pickle!r}")
    check_device(device)
    if max_memory is not None and not meta and torch.device(device).type != "cpu":  # (what stays resident: CPU)
        raise CompressError(f"max_memory runs a model larger than memory on the CPU; device={device!r} needs the "
                            "model whole on the GPU: load without max_memory there")

    # a folder saved over while it is read (each save renames a new folder into place) would give a model mixed
    # from two saves, silently: the folder's identity before and after the read tells, and the read is repeated
    # (an offloaded model reads its layers later too: a save over its folder then is not seen)
    offloaded = max_memory is not None and not meta
    for _ in range(3):
        path = resolve_model_path(source)
        before = _folder_identity(path)
        try:
            with _BUILDING:
                model, stored_as = _read_folder(path, dtype, device, allow_pickle, meta, max_memory, offload_folder)
        except Exception:
            if _folder_identity(path) == before:
                raise
            continue
        if _folder_identity(path) == before:
            break
    else:
        raise CheckpointError(f"{source} was replaced while it was read, three times (another process is saving "
                              "over it); load it once that save is done")
    # the baseline `compress eval` finds for checkpoints made from it: absolute here, recorded relative to the
    # checkpoint folder when one is saved (checkpoint._portable_source)
    model.compress_source = str(source) if str(source).startswith("builtin:") else str(path.resolve())
    _absolute_recorded_source(model, path)
    model.compress_storage_dtype = stored_as
    section = getattr(model.config, "compression", None)
    if isinstance(section, dict) and not section.get("export_format"):  # (an export loads as transformers' model)
        from .save_pretrained import route_save_pretrained

        route_save_pretrained(model)
    if not meta and not offloaded:
        model.to(device)
        set_sparse_runtime(model, sparse_runtime)
    release_freed_heap()  # what the load freed (swapped-out layers, decoded packed values, per-layer reads)
    model.eval()
    return model


# transformers builds a model under torch's default dtype, one setting for the whole process: two loads at once in
# two threads built models of mixed dtypes (float32 tensors among bfloat16 ones) and left the default at bfloat16
_BUILDING = threading.RLock()


def unwrapped(model, caller: str):
    """The transformers model under `torch.compile`'s wrapper (its module names carry `_orig_mod.`, which a checkpoint
    then held and no load found); PEFT's wrapper refused in one line (its LoRA matrices were quantized as layers and
    the checkpoint did not load)."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(model, nn.Module) and isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        model = inner
    if type(model).__module__.split(".")[0] == "peft":
        raise CompressError(f"{caller} takes the transformers model, not PEFT's {type(model).__name__}: merge the "
                            "adapter first (model = model.merge_and_unload()); to train LoRA after compressing, "
                            "add a recover pass")
    return model


def _folder_identity(path: Path) -> tuple | None:
    """What changes when another save is renamed into `path` and not when a file is added beside the checkpoint: the
    folder's inode and its config.json's inode and write time (every save writes a new one; a new folder may get
    the freed inode of the one it replaced)."""
    try:
        folder = path.stat()
    except OSError:
        return None
    try:
        config = (path / "config.json").stat()
        written = (config.st_ino, config.st_mtime_ns)
    except OSError:
        written = None
    return folder.st_dev, folder.st_ino, written


def _read_folder(path: Path, dtype, device, allow_pickle: bool, meta: bool, max_memory, offload_folder):
    """(model, its storage dtype) from the folder `path`, as `load` describes."""
    from .checkpoint import load_checkpoint, load_hf_folder
    from .checkpoint_validation import read_generation_config

    config = read_config(path)
    generation = read_generation_config(path)  # before building: from_pretrained reads it too, with tracebacks
    stored_as = storage_dtype(config, path)  # before building: from_config/from_pretrained rewrite config.dtype
    dtype = compute_dtype(dtype, stored_as, device)
    section = compression_section(path)
    if max_memory is not None and not meta:
        from .offload import load_offloaded_folder

        exported = section is not None and section.get("export_format")
        # a quantized export's tensors are the format's (weight_packed, ...); a pruned-only export holds plain dense
        # weights and reads as any Hugging Face folder
        if exported and getattr(config, "quantization_config", None):
            raise CheckpointError(f"{path} is a {section['export_format']} export of quantized layers, which "
                                  "max_memory loading does not read: load it without max_memory, or load the native "
                                  "checkpoint it came from with max_memory")
        model = load_offloaded_folder(path, config, None if exported else section, dtype=dtype,
                                      max_memory=max_memory, offload_folder=offload_folder, device=device)
    elif section is not None and not section.get("export_format"):  # an export for other tools reads as HF
        model = load_checkpoint(path, config, section, dtype=dtype, meta=meta)
    else:
        model = load_hf_folder(path, config, dtype=dtype, allow_pickle=allow_pickle, meta=meta)
    if not meta and dtype == torch.float16 and stored_as != torch.float16:
        # our cast, so our error: bfloat16/float32 values past float16's +-65504 became inf (and were saved back);
        # NaN is the checkpoint's own (apply and eval say so)
        bad = [(name, count, nans) for name, count, nans in nonfinite_weights(model) if count > nans]
        if bad:
            raise CheckpointError(f"{path.name}: loading its {str(stored_as).removeprefix('torch.')} weights as "
                                  f"float16 leaves {describe_nonfinite(bad)} (values past float16's +-65504 "
                                  "overflow); load it as bfloat16 or float32 (--dtype)")
    if generation is not None and getattr(model, "generation_config", None) is not None:
        # (models built from config.json alone, compressed checkpoints, would get defaults derived from it)
        model.generation_config = generation
        from .cache_choice import drop_unusable_cache_implementation

        drop_unusable_cache_implementation(model)  # (checkpoints written before the passes removed it)
    return model, stored_as


def nonfinite_weights(model: nn.Module) -> list[tuple[str, int, int]]:
    """(name, how many of its values are NaN or inf, how many NaN) for each floating parameter or saved buffer
    holding any; the meta tensors of layers left on disk are skipped."""
    bad, seen = [], set()
    for prefix, module in model.named_modules():
        tensors = list(module._parameters.items()) + [
            (k, b) for k, b in module._buffers.items() if k not in module._non_persistent_buffers_set]
        for key, t in tensors:
            if t is None or id(t) in seen or not t.is_floating_point() or t.is_meta:
                continue
            seen.add(id(t))
            t = t.detach() if t.element_size() > 1 else t.detach().float()  # (float8: few ops take it)
            # a sum is finite only when every term is (0.82 vs isfinite's 0.43 Gelem/s on two cores, ~9 s for 7B);
            # where it is not, count exactly (a float32 sum can also overflow on finite weights)
            if math.isfinite(float(t.sum(dtype=torch.float32 if t.element_size() < 4 else None))):
                continue
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                bad.append((f"{prefix}.{key}" if prefix else key, int((~finite).sum()), int(t.isnan().sum())))
    return bad


def describe_nonfinite(bad: list[tuple[str, int, int]]) -> str:
    name, count, _ = bad[0]
    more = f", and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''}" if len(bad) > 1 else ""
    return f"{count} NaN or inf value{'s' if count != 1 else ''} in {name}{more}"


def checkpoint_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `save` writes this model's floating tensors in: the dtype it was loaded from; for a model built in
    code, its config's dtype, else the dtype most of its floating weights hold (bf16 was assumed: `apply` rounded
    a float32 model's every weight to bf16, passes or not)."""
    stored = getattr(model, "compress_storage_dtype", None) or _config_dtype(model.config)
    if stored is not None:
        return stored
    elements: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            elements[p.dtype] = elements.get(p.dtype, 0) + p.numel()
    return max(elements, key=elements.get) if elements else torch.bfloat16


DTYPE_CHOICES = ("auto", "stored", *DTYPES)


def compute_dtype(dtype: str | torch.dtype | None, stored: torch.dtype, device: str = "cpu") -> torch.dtype:
    """The dtype a model is loaded in (see `load`)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise CompressError(f"dtype {dtype} cannot hold a model's weights; use one of {', '.join(DTYPE_CHOICES)}")
        return dtype
    if dtype is None or dtype == "stored":
        return stored
    if dtype == "auto":
        return stored if native_dtype(stored, device) else torch.float32
    if dtype not in DTYPES:
        raise CompressError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


CPU_HALF_ENV = "COMPRESS_CPU_HALF_PRECISION"  # "off": `auto` computes in float32 on every CPU


def native_dtype(dtype: torch.dtype, device: str = "cpu") -> bool:
    """Whether `device` computes in `dtype` at full speed (half precision on CPUs needs AVX512-BF16/FP16 or AMX).

    COMPRESS_CPU_HALF_PRECISION=off answers no for half precision on every CPU, so that `auto` gives the same float32
    numerics on any machine (the test suite sets it: its tolerances are float32's)."""
    if dtype == torch.float32 or not str(device).startswith("cpu"):
        return True
    if setting(CPU_HALF_ENV) == "off":
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


def layers_left_on_disk(source: str | Path, *, max_memory, dtype: str | torch.dtype | None = "auto",
                        device: str = "cpu") -> set[int]:
    """The decoder layers `load(source, dtype=dtype, max_memory=max_memory)` would leave on disk, planned from the
    config alone (no weights read): what fits is decided at the compute dtype, as the loader decides it."""
    from .offload import empty_structure, offload_plan

    path = resolve_model_path(source)
    config = read_config(path)
    dtype = compute_dtype(dtype, storage_dtype(config, path), device)
    section = compression_section(path)
    native = section if section is not None and not section.get("export_format") else None
    return offload_plan(empty_structure(config, native, dtype, path), dtype, max_memory)


def text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def context_length(config) -> int | None:
    """The model's context in tokens, None where it says none: max_position_embeddings of its text config, or what
    a yarn / dynamic-NTK rope scaling reaches from it (factor x the original context, which is what transformers
    scales from: Qwen2.5 keeps 32768 and adds yarn factor 4, and 128k-token text was refused as longer than 32768).
    Linear scaling is left alone: its checkpoints usually store the extended length already."""
    text = text_config(config)
    most = getattr(text, "max_position_embeddings", None)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    if not isinstance(most, int) or not isinstance(rope, dict):
        return most
    factor = rope.get("factor")
    if (rope.get("rope_type") or rope.get("type")) in ("yarn", "dynamic") and isinstance(factor, (int, float)) \
            and math.isfinite(factor) and factor > 1:
        original = rope.get("original_max_position_embeddings")
        original = int(original) if isinstance(original, (int, float)) and math.isfinite(original) else most
        return max(most, int(factor * original))
    return most


def recorded_source_path(folder: Path, source: str) -> Path | None:
    """Where the model a checkpoint at `folder` was made from is, if it is here: recorded relative to the checkpoint's
    folder (older checkpoints: to the working directory where they were made)."""
    found = next((c for c in (folder / source, Path(source)) if c.exists()), None)
    return None if found is None else found.resolve()


def _absolute_recorded_source(model: nn.Module, folder: Path) -> None:
    """In memory the recorded source is absolute, so that a checkpoint saved or exported from this model elsewhere
    records it relative to its own folder (checkpoint._portable_source) instead of pointing at the wrong place."""
    recorded = getattr(model.config, "compression", None)
    source = recorded.get("source_model") if isinstance(recorded, dict) else None
    if not isinstance(source, str) or source.startswith("builtin:") or Path(source).is_absolute():
        return
    found = recorded_source_path(folder, source)
    if found is not None:
        recorded["source_model"] = str(found)


def check_token_ids(ids: torch.Tensor, config, what: str, fix: str = "", *, check_context: bool = True,
                    where: str = "") -> None:
    """Token ids a tokenizer produced must index the model's embedding, and sequences fit its context (unless
    `check_context` is False: a fully linearized model has no context limit): a tokenizer from another model fails
    here, before any work, instead of as an IndexError deep in the forward pass. `where`: the recipe line that set
    the length, named in the context error."""
    text = text_config(config)
    vocab = getattr(text, "vocab_size", None)
    context = context_length(config) if check_context else None
    if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
        raise CompressError(f"{what}: the tokenizer gives token id {int(ids.max())}, but the model's vocabulary has "
                            f"{vocab} entries: the tokenizer does not belong to this model")
    if context is not None and ids.dim() == 2 and ids.shape[1] > context:  # `where`: the recipe line of the length
        raise CompressError(f"{where + ': ' if where else ''}{what}: sequences of {ids.shape[1]} tokens are longer "
                            "than the model's context "
                            f"({context} tokens)" + (f"; {fix}" if fix else ""))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_device(device) -> None:
    """'cpu', 'cuda' or 'cuda:N' on a machine that has CUDA, else a one-line CompressError."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise CompressError(f"device={device!r}: use 'cpu' or 'cuda' (or 'cuda:N')")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"device={device!r}, but torch sees no CUDA GPU here; use device='cpu'")


def load_tokenizer(source: str | Path, strict: bool = True):
    """The folder's tokenizer; None without tokenizer files. Files that cannot be read are a CheckpointError, or
    None with `strict=False` (for work that may need no text: the pass or command that does need it says so)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(source)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        return None  # passes and commands that need text say so (AutoTokenizer would first warn about config.json)
    kwargs = {}
    if (path / "config.json").exists():  # AutoTokenizer reads it too: a damaged one is reported as such
        from .checkpoint_validation import read_config_json

        read_config_json(path)
        try:  # given the config, AutoTokenizer does not read a native checkpoint's marked one (and warn about it)
            kwargs["config"] = read_config(path)
        except CompressError:  # e.g. a model type compress does not support: the tokenizer may still serve
            pass
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions on damaged files
        if not strict:
            return None
        raise CheckpointError(f"{path}: its tokenizer files cannot be read ({first_line(exc)})") from None


def saved_tokenizer_difference(ours, source: str | Path) -> str | None:
    """`tokenizer_difference` against the tokenizer saved with the model at `source`; None where it saved none
    (nothing to compare). Damaged tokenizer files are an error, not taken for none."""
    try:
        theirs = load_tokenizer(source)
    except CompressError as exc:
        raise CompressError(f"the baseline's tokenizer: {exc}") from None
    return None if theirs is None else tokenizer_difference(ours, theirs)


def tokenizer_difference(ours, theirs, names: tuple[str, str] = ("the model's", "the baseline's")) -> str | None:
    """How tokenizer `theirs` reads the ids `ours` writes otherwise (None: the same). Every token of `ours` must have
    the same id in `theirs` (tokens only `theirs` has are never written by `ours`). Which token is BOS / EOS may
    differ (a base model and its instruct tune): the evaluation feeds both models the same ids, and the same ids
    mean the same tokens. The vocabulary size alone, what the models' shapes show, misses a tokenizer of the same
    size with its ids in another order."""
    a, b = ours.get_vocab(), theirs.get_vocab()
    moved = [t for t, i in a.items() if b.get(t) != i]
    if moved:
        t = min(moved, key=a.get)
        other = f"{b[t]} in {names[1]}" if t in b else f"not in {names[1]}"
        return (f"{len(moved)} of the {len(a)} tokens of {names[0]} tokenizer have other ids in {names[1]} "
                f"(e.g. {t!r}: id {a[t]} in {names[0]}, {other})")
    return None

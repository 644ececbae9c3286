"""Validation of a model folder before and after its weights load: every way a damaged or hand-edited checkpoint
can fail is found here and reported as one CheckpointError line that names the file and what is wrong.

- config.json: valid JSON, a mapping; the `compression` section a mapping with a list of pass entries;
- safetensors files: read header-first without trusting it (size, header length, JSON, dtypes, offsets inside
  the file), before safetensors or transformers open them;
- tensors against the model built from the config: names, shapes, and integer vs floating kinds;
- packed modules against the metadata that describes them (`check_loaded_modules`), e.g. a bitmask whose set bits
  must equal the number of stored values, N:M positions that must be distinct in each group, VQ codes in range."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, first_line

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOATING = {"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"}
INTEGER_NAMES = {torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                 torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}


def header_nbytes(dtype: str, shape) -> int:
    """Bytes of a tensor as a safetensors header describes it."""
    return math.prod(shape) * ITEM_SIZES[dtype]


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; the file is damaged: copy or export the model again")


# ------------------------------------------------------------------------------------------------- config.json
def read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _damaged(path, f"not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise _damaged(path, f"not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})") from None
    except RecursionError:  # (thousands of nested brackets: Python's parser gives up)
        raise _damaged(path, "nested too deeply to read") from None
    if not isinstance(config, dict):
        raise _damaged(path, f"holds a JSON {type(config).__name__}, not an object")
    if not isinstance(config.get("model_type", ""), str):
        raise _damaged(path, "`model_type` is not a string")
    from .export.native_marker import MARKERS, REAL_MODEL_TYPE_KEY

    # marked for transformers to refuse: without the record of its passes nothing can rebuild the layers (another
    # type of `compression` is named by check_compression_section)
    missing = [k for k in ("compression", REAL_MODEL_TYPE_KEY) if config.get(k) is None]
    if config.get("model_type") in MARKERS and missing:
        raise _damaged(path, f"a compress checkpoint whose `{missing[0]}` entry is missing (edited?)")
    return config


def _a(value: Any) -> str:
    """'a list', 'an int': the type of a value found where another was expected."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def check_compression_section(folder: Path, section: Any) -> dict | None:
    """The `compression` section, checked for the types the loader relies on (values are checked by each pass)."""
    where = folder / "config.json"
    if section is None:
        return None
    if not isinstance(section, dict):
        raise _damaged(where, f"the `compression` section is {_a(section)}, not a mapping")
    passes = section.get("passes", [])
    if not isinstance(passes, list):
        raise _damaged(where, f"`compression.passes` is {_a(passes)}, not a list")
    for i, entry in enumerate(passes):
        if not isinstance(entry, dict) or not isinstance(entry.get("pass"), str):
            raise _damaged(where, f"`compression.passes[{i}]` is not a mapping with a `pass` name")
        for key in ("args", "restore"):
            if entry.get(key) is not None and not isinstance(entry[key], dict):
                raise _damaged(where, f"`compression.passes[{i}].{key}` is {_a(entry[key])}, "
                                      "not a mapping")
    for key in ("source_model", "calibration_hash", "recipe_hash"):  # read as text by eval, apply and inspect
        if section.get(key) is not None and not isinstance(section[key], str):
            raise _damaged(where, f"`compression.{key}` is {_a(section[key])}, not a string")
    sketch = section.get("calibration_sketch")
    if sketch is not None and not _valid_sketch(sketch):  # (read by eval and by a later apply, which merges it)
        raise _damaged(where, "`compression.calibration_sketch` is not {ngram, modulus (a power of 2 >= 64), "
                              "hashes (8 hex digits each, in one string)}")
    return section


def _valid_sketch(sketch) -> bool:
    if not isinstance(sketch, dict):
        return False
    modulus, ngram = sketch.get("modulus"), sketch.get("ngram")
    if type(modulus) is not int or modulus < 64 or modulus & (modulus - 1) or type(ngram) is not int or ngram < 1:
        return False
    hashes = sketch["hashes"]
    return isinstance(hashes, str) and len(hashes) % 8 == 0 and all(c in "0123456789abcdef" for c in hashes)


# ------------------------------------------------------------------------------------------------- safetensors
def headers_float_dtype(headers: dict[str, tuple[str, tuple[int, ...]]]) -> torch.dtype | None:
    """The floating dtype most of a checkpoint's floating elements are stored in (None: no floating tensor)."""
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    elements: dict[torch.dtype, int] = {}
    for dtype, shape in headers.values():
        if dtype in names:
            elements[names[dtype]] = elements.get(names[dtype], 0) + math.prod(shape)
    return max(elements, key=elements.get) if elements else None


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} from a file's header, every field checked against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                raise _damaged(path, "is empty (0 bytes)")
            if len(head) < 8:
                raise _damaged(path, f"is {size} bytes, shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise _damaged(path, f"declares a {length}-byte header (at most {MAX_HEADER_BYTES}): not a "
                                     "safetensors file")
            if 8 + length > size:
                raise _damaged(path, f"is truncated: its header needs {8 + length} bytes, the file has {size}")
            header_bytes = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _damaged(path, "has a header that is not JSON: not a safetensors file") from None
    if not isinstance(header, dict):
        raise _damaged(path, "has a header that is not a JSON object")
    data_size = size - 8 - length
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in info.items())):
                raise _damaged(path, "has a __metadata__ entry that is not a mapping of strings")
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = (dtype in ITEM_SIZES and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise _damaged(path, f"tensor {name!r} has a malformed header entry")
        if end > data_size:
            raise _damaged(path, f"is truncated: tensor {name!r} ends at byte {end} of a {data_size}-byte data "
                                 "section")
        if end - begin != header_nbytes(dtype, shape):
            raise _damaged(path, f"tensor {name!r}: {end - begin} bytes stored for shape {list(shape)} of {dtype}")
        out[name] = (dtype, shape)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:  # two tensors would read the same bytes (safetensors raises its own error class)
            raise _damaged(path, f"tensors {first!r} and {second!r} overlap in the data section")
    covered = sum(end - begin for begin, end, _ in spans)
    if covered != data_size:  # gaps or trailing bytes: the safetensors reader refuses such a file
        raise _damaged(path, f"holds {data_size - covered} bytes that no tensor covers (gaps or trailing data)")
    return out


def check_weight_files(folder: Path, files: list[Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Headers of every weight file of `folder`, merged (a tensor in two shards is an error)."""
    if not files:
        pickled = sorted(f.name for f in Path(folder).glob("*") if f.suffix in (".bin", ".pt", ".pth"))
        if pickled:  # never unpickled here: say what is there and how to read it
            how = ", or pass --allow-pickle to eval/generate/apply if you trust them" \
                if any(name.endswith(".bin") for name in pickled) else ""
            raise CheckpointError(f"{folder} has no *.safetensors weights, only pickled ones ({', '.join(pickled[:2])}); "
                                  f"convert them to safetensors{how}")
        raise CheckpointError(f"{folder} has no *.safetensors weights")
    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    source: dict[str, Path] = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{folder}: shard {f.name} named by the index is missing")
        for name, info in read_header(f).items():
            if name in headers:
                if source[name] != f:  # two weight files hold it: a copy left beside the weights, usually
                    raise CheckpointError(f"{folder}: tensor {name!r} is in both {source[name].name} and {f.name}; "
                                          "a checkpoint holds one copy of its weights: move the extra file out")
                raise _damaged(f, f"tensor {name!r} is stored twice")
            headers[name], source[name] = info, f
    return headers


def read_index(path: Path) -> dict[str, str]:
    """The weight map of a sharded checkpoint's index file."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v and "\\" not in v
                                                        for v in weight_map.values()):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise _damaged(path, "is not a valid index (a `weight_map` of tensor name -> shard file name)") from None
    return weight_map


def check_against_model(folder: Path, headers: dict[str, tuple[str, tuple[int, ...]]], model: nn.Module,
                        tied: set[str]) -> None:
    """Names, shapes and integer/floating kinds of the stored tensors against the model built from the config."""
    from .inspection import derived_tensor_names

    expected = model.state_dict()
    optional = tied | derived_tensor_names(model)  # stored once / rebuilt on load (older checkpoints store them)
    missing = [k for k in expected if k not in headers and k not in optional]
    unexpected = [k for k in headers if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(headers[k][1])} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in headers and tuple(headers[k][1]) != tuple(v.shape)]
    # integers exactly: loading casts, so codes or positions stored wider would wrap into range past the checks
    kinds = dtype_mismatches(headers, expected, exact_integers=True)
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
                        + (" (a LoRA adapter saved among the weights by transformers' save_pretrained: save the model "
                           "with compress.save, which writes it as adapter/)" if any(".lora_" in k for k in unexpected)
                           else ""))
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong[:3])}")
    if kinds:
        problems.append(f"wrong dtypes: {'; '.join(kinds[:3])}")
    if problems:
        raise CheckpointError(f"{folder} does not match its config: " + " | ".join(problems))


def dtype_mismatches(headers: dict[str, tuple[str, tuple[int, ...]]], expected: dict[str, torch.Tensor], *,
                     exact_integers: bool, stored: str = "checkpoint") -> list[str]:
    """"name: checkpoint DTYPE vs model dtype" for stored tensors of the other kind (integer for floating or the
    reverse: loading casts them without a word), and with `exact_integers` integers of another width."""
    return [f"{k}: {stored} {headers[k][0]} vs model {str(v.dtype).removeprefix('torch.')}"
            for k, v in expected.items()
            if k in headers and ((headers[k][0] in FLOATING) != v.is_floating_point()
                                 or (exact_integers and not v.is_floating_point()
                                     and headers[k][0] != INTEGER_NAMES.get(v.dtype)))]


def check_export_quantization(folder: Path, quantization: dict, headers: dict[str, tuple[str, tuple[int, ...]]],
                              model: nn.Module) -> None:
    """A compressed-tensors export's quantized tensors against its quantization_config (one scheme for every
    group, as compress writes it; other exports are left to the loader): scale columns per group and packed columns
    per bit width. A hand-edited group_size loaded with an error in transformers while inspect reported it whole."""
    schemes = {json.dumps((g or {}).get("weights"), sort_keys=True)
               for g in (quantization.get("config_groups") or {}).values()}
    weights = json.loads(schemes.pop()) if len(schemes) == 1 else None
    if not isinstance(weights, dict):
        return
    bits, group, strategy = weights.get("num_bits"), weights.get("group_size"), weights.get("strategy")
    problems = []
    for key, (_, shape) in headers.items():
        if not key.endswith(".weight_scale"):
            continue
        name = key.removesuffix(".weight_scale")
        try:
            width = model.get_submodule(name).in_features
        except AttributeError:  # not a module of the model: check_weight_files' business
            continue
        columns = shape[-1] if shape else 1
        want = 1 if strategy == "channel" else -(-width // group) if strategy == "group" and group else None
        if want is not None and columns != want:
            problems.append(f"{key} holds {columns} scale column(s) for {width} inputs, not the {want} its "
                            f"{strategy} scheme (group_size {group}) gives")
        packed = headers.get(f"{name}.weight_packed")
        if packed is not None and bits and packed[1][-1] != -(-width * bits // 32):  # rows padded to whole words
            problems.append(f"{name}.weight_packed holds {packed[1][-1] * 32 // width} bits a weight, not num_bits "
                            f"{bits}")
    if problems:
        raise CheckpointError(f"{folder}: its quantization_config does not match its tensors (edited or damaged): "
                              + problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                              + "; export the checkpoint again")


# ------------------------------------------------------------------------------------------------- packed modules
def check_loaded_modules(folder: Path, model: nn.Module, prefix: str = "", skip: str | None = None) -> None:
    """Every packed module's tensors against the metadata that describes it (after the state dict loaded).
    `prefix`: `model` is the submodule of that name; `skip`: names under it are not checked (not loaded yet)."""
    from .prune.sparse_linear import SparseLinear
    from .quantize.quantized_linear import QuantizedLinear
    from .vq_logits.head import VQLogitsHead

    for name, module in model.named_modules(prefix=prefix):
        if skip and name.startswith(skip):
            continue
        if isinstance(module, SparseLinear):
            problem = _sparse_problem(module)
        elif isinstance(module, VQLogitsHead):
            problem = _vq_problem(module)
        elif isinstance(module, QuantizedLinear):
            problem = _quantized_problem(module)
        else:
            continue
        if problem:
            raise CheckpointError(f"{folder}: {name}: {problem}; the checkpoint is damaged: export it again")


@torch.no_grad()
def _sparse_problem(m) -> str | None:
    if m.format == "bitmask":
        from .kernels.sparse_bitmask import unpack_bitmask

        problem = _bitmask_width_problem(m.bitmask, m.in_features)
        if problem:
            return problem
        kept = int(unpack_bitmask(m.bitmask, m.in_features).sum())
        if kept != m.values.numel():
            return f"its bitmask keeps {kept} weights but {m.values.numel()} values are stored"
        return None
    return _nm_problem(m.indices, m.n, m.m, m.in_features)


def _nm_problem(indices: torch.Tensor, n: int, m: int, in_features: int) -> str | None:
    """N:M positions (packed bit fields, `n` kept of each `m` inputs) that the kernels would misread."""
    from .kernels.sparse_nm import nm_positions

    if not (0 < n <= m) or in_features % m:
        return f"N:M = {n}:{m} does not fit input width {in_features}"
    pos = nm_positions(indices, in_features // m * n, m).long()
    if bool((pos >= m).any()):
        return f"an N:M position is >= M={m}"
    groups = pos.view(pos.shape[0], -1, n)
    if n > 1 and bool((groups[..., 1:] <= groups[..., :-1]).any()):
        return f"its {n}:{m} positions repeat (or are out of order) inside a group"
    return None


def _bitmask_width_problem(bitmask: torch.Tensor, in_features: int) -> str | None:
    full = torch.stack([(bitmask >> b) & 1 for b in range(8)], dim=-1).view(bitmask.shape[0], -1)
    return "its bitmask sets bits past the layer's input width" if bool(full[:, in_features:].any()) else None


@torch.no_grad()
def _quantized_problem(q) -> str | None:
    """A quantized layer pruned first: its N:M positions / bitmask (its codes' checks are the loader's shapes)."""
    if q.sparsity == "nm":
        return _nm_problem(q.indices, q.n, q.m, q.in_features)
    if q.sparsity == "bitmask":
        return _bitmask_width_problem(q.bitmask, q.in_features)
    return None


@torch.no_grad()
def _vq_problem(h) -> str | None:
    table = h.num_codes + h.shortlist_size
    if h.codes.numel() and (int(h.codes.long().min()) < 0 or int(h.codes.long().max()) >= table):
        return f"a token's code is outside the {table} codebook rows"
    if h.shortlist_size and (int(h.shortlist_ids.long().min()) < 0
                             or int(h.shortlist_ids.long().max()) >= h.out_features):
        return "a shortlist token id is outside the vocabulary"
    return None


# ------------------------------------------------------------------------------------------- generation config
def read_generation_config(path: Path):
    """The folder's generation_config.json (end-of-sequence ids, sampling defaults) as from_pretrained reads it, or
    None without one; a file generate could not use is a CheckpointError."""
    from transformers import GenerationConfig

    if not (path / "generation_config.json").is_file():
        return None
    try:
        config = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError; a list/string: TypeError
        raise CheckpointError(f"{path / 'generation_config.json'}: cannot be read ({first_line(exc)})") from None
    problem = _generation_config_problem(config)
    if problem:  # (generate failed on it with a traceback)
        raise CheckpointError(f"{path / 'generation_config.json'}: {problem}; fix or remove the file")
    return config


def _generation_config_problem(config) -> str | None:
    """What generate cannot take in a (hand-edited) generation config: token ids that are not integers, counts that
    are not non-negative integers, sampling settings that are not numbers."""
    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    for field in ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id"):
        v = getattr(config, field, None)  # (any integer: some published configs say -1 for none)
        if v is not None and not all(isinstance(i, int) and not isinstance(i, bool)
                                     for i in (v if isinstance(v, list) else [v])):
            return f"{field} is {v!r}, not a token id (an integer, or a list of them for eos_token_id)"
    for field in ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "top_k", "num_beams",
                  "num_return_sequences"):
        v = getattr(config, field, None)
        if v is not None and not whole(v):
            return f"{field} is {v!r}, not a non-negative integer"
    for field in ("temperature", "top_p", "repetition_penalty"):
        v = getattr(config, field, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"{field} is {v!r}, not a number"
    return None

"""Export to compressed-tensors: the checkpoint layout llm-compressor writes and transformers and vLLM read.

What maps where (compressed-tensors 0.20):
- a symmetric `QuantizedLinear` (int4/int8 codes, group scales) -> `weight_packed` (int32, packed by
  compressed-tensors' own `PackedQuantizationCompressor`), `weight_scale`, `weight_shape`, format "pack-quantized";
  an asymmetric one -> int8 `weight` + `weight_scale` + `weight_zero_point`, format "int-quantized" (see
  `storage_format`), which transformers loads and vLLM does not (`int_quantized_note`); one `config_groups` entry
  per (bits, group size, symmetric) scheme. The codes are relabelled, never requantized: the exporter checks that
  compressed-tensors' decompression gives back `dequantized_weight()`.
  A layer whose width is not a multiple of its group size is stored dense (compressed-tensors needs whole groups)
  and named in `ignore`; the summary lists it.
- a pruned `SparseLinear` -> its dense weight (zeros where pruned), described by a `sparsity_config` of format
  "dense" (compressed-tensors' `DenseSparsityConfig`: structure "2:4" or "unstructured", global sparsity, targets),
  kept in config.json's `compression` provenance (not in `quantization_config`, which vLLM would refuse).
  compressed-tensors 0.20 no longer ships the sparse-bitmask / sparse-24-bitmask compressors (and vLLM >= 0.19.1
  dropped Sparse24), so no current loader reads a bitmask layout: pruning alone does not shrink this export;
  quantization (4-bit on top of 2:4 included) does.
- what compressed-tensors cannot express (a VQ-Logits head, GEAR KV settings, linearized attention, activation
  sparsity thresholds, bitsandbytes layers) fails before any work, naming the pass (`check_passes`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError
from ..hessian import SAME_INPUT_LINEARS
from ..prune.sparse_linear import SparseLinear

FORMAT = "compressed-tensors"
INSTALL_HINT = "the compressed-tensors export needs the compressed-tensors package: pip install 'compress[ct]'"
# pass -> why compressed-tensors cannot hold what it made
INEXPRESSIBLE = {
    "vq_logits": "its codebook output head has no compressed-tensors layout",
    "gear_kv": "its KV-cache settings (GEAR/KIVI) have no compressed-tensors equivalent",
    "linearize": "linearized attention layers are not transformers modules",
    "activation_sparsity": "its activation thresholds are not a weight format",
}
BNB_METHODS = ("nf4", "fp4", "int8", "bnb_nf4", "bnb_fp4", "bnb_int8", "llm_int8")


NATIVE_ADVICE = ": drop those passes or use the native format (the default)"
# (`compress export` starts from a native checkpoint: there is nothing to switch to)
ALREADY_NATIVE_ADVICE = "; the checkpoint stays in the native format, which compress.load reads"
# a bitsandbytes checkpoint compress did not mark native is in the layout transformers' bitsandbytes integration
# writes (recipes/nf4.yaml): it needs no export
BNB_PLAIN_ADVICE = (", and plain transformers too (its bitsandbytes layers are in transformers' own layout: "
                    "AutoModelForCausalLM.from_pretrained loads it, with bitsandbytes installed)")
# the weight-only int formats vLLM builds a layer from (its WNA16 and W4A16-2:4 schemes); a weight-only group in any
# other format ends at its "No compressed-tensors compatible scheme was found"
VLLM_WEIGHT_ONLY_FORMATS = ("pack-quantized", "marlin-24")


def already_native_advice(config: dict) -> str:
    """What `compress export` adds to a refusal, from the checkpoint's config.json: it stays native, and where that
    is a bitsandbytes checkpoint transformers reads (no native marker), that plain transformers loads it as well."""
    from .native_marker import MARKERS

    quantization = config.get("quantization_config")
    bnb = isinstance(quantization, dict) and quantization.get("quant_method") == "bitsandbytes"
    return ALREADY_NATIVE_ADVICE + (BNB_PLAIN_ADVICE if bnb and config.get("model_type") not in MARKERS else "")


def vllm_unloadable_formats(quantization: dict | None) -> list[str]:
    """The formats of a compressed-tensors `quantization_config`'s weight-only groups that vLLM builds no layer
    from (a group without its own format takes the config's); [] when vLLM loads every group."""
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "compressed-tensors":
        return []
    found = set()
    for group in (quantization.get("config_groups") or {}).values():
        if not isinstance(group, dict) or not group.get("weights") or group.get("input_activations"):
            continue
        fmt = group.get("format") or quantization.get("format")
        if fmt not in VLLM_WEIGHT_ONLY_FORMATS:
            found.add(str(fmt))
    return sorted(found)


def check_passes(passes: list[tuple[str, dict]], advice: str = NATIVE_ADVICE) -> None:
    """Raise ExportError (before any work) when a pass makes something compressed-tensors cannot express."""
    problems = []
    for name, args in passes:
        if name in INEXPRESSIBLE:
            problems.append(f"pass {name!r}: {INEXPRESSIBLE[name]}")
        elif name == "quantize" and str((args or {}).get("method", "")).lower() in BNB_METHODS:
            problems.append(f"pass 'quantize' (method {args['method']}): bitsandbytes layers have their own layout")
        elif name == "recover" and (args or {}).get("merge", True) is False:
            problems.append("pass 'recover' (merge: false): its LoRA adapter folder is not a weight format (merge: "
                            "true merges it, a pruned layer keeping its zeros)")
        elif name not in ("prune", "quantize", "recover"):  # a merged recover leaves dense or still-packed layers
            problems.append(f"pass {name!r}: compressed-tensors holds pruned and int-quantized weights (and LoRA "
                            "merged into them) only")
    if problems:
        raise ExportError(f"the {FORMAT} format cannot express " + "; ".join(problems) + advice)


def group_fallback(model: nn.Module, passes) -> dict[str, str]:
    """Before any work: the layers the int quantize `passes` will quantize that compressed-tensors stores dense
    (float32, exact), because their width is no multiple of the group (its groups are whole); ExportError when that
    is every one of them (the export would be the dense model, larger than the original)."""
    fallback, total = {}, 0
    for p in passes:
        if p.name != "quantize" or p.config.method in BNB_METHODS:
            continue
        group = p.config.group_size
        for name in p.describe(model):
            width = model.get_submodule(name).in_features
            total += 1
            if group != -1 and width > group and width % group:
                fallback[name] = _fallback_reason(width, group)
    if total and len(fallback) == total:
        raise ExportError(_all_dense(fallback))
    return fallback


def _fallback_reason(width: int, group: int) -> str:
    return (f"in_features {width} is not a multiple of group_size {group}: stored as float32 (exact; a group_size "
            f"dividing {width} keeps it quantized)")


def _all_dense(fallback: dict[str, str]) -> str:
    return (f"--format {FORMAT} would store every quantized layer dense ({len(fallback)}: "
            f"{next(iter(fallback.values()))}), larger than the unquantized model: quantize with a group_size that "
            "divides the layers' widths, or keep the native format")


def _require_package():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ExportError(INSTALL_HINT) from None


@dataclass
class ExportSummary:
    quantized: list[str] = field(default_factory=list)
    sparse: list[str] = field(default_factory=list)
    dense_fallback: dict[str, str] = field(default_factory=dict)  # module -> why it is stored dense
    int_quantized: list[str] = field(default_factory=list)  # asymmetric: one code per byte, vLLM cannot load them
    vllm_mixed_fused: list[str] = field(default_factory=list)  # q/k/v or gate/up in other schemes: vLLM refuses
    note: str | None = None  # what the user should know of where the export loads (`int_quantized_note`)
    format: str = "dense"
    sparsity_structure: str | None = None
    global_sparsity: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "quantization_format": self.format, "quantized_modules": len(self.quantized),
                "sparse_modules": len(self.sparse), "sparsity_structure": self.sparsity_structure,
                "global_sparsity": round(self.global_sparsity, 6),
                "stored_dense": self.dense_fallback, "int_quantized": self.int_quantized,
                "vllm_mixed_fused": self.vllm_mixed_fused, "note": self.note}


def _is_quantized(module: nn.Module) -> bool:
    from ..quantize.quantized_linear import QuantizedLinear

    return isinstance(module, QuantizedLinear)


def storage_format(module) -> str:
    """Symmetric codes are packed 32/bits per int32 ("pack-quantized"). Asymmetric ones are stored one per byte
    ("int-quantized"): compressed-tensors 0.20 packs their zero points, but the layout it builds when transformers
    loads does not, so a packed asymmetric layer fails to load ("size mismatch" on weight_zero_point)."""
    return "pack-quantized" if module.symmetric else "int-quantized"


def int_quantized_note(model: nn.Module, summary: ExportSummary) -> str | None:
    """The note on an export with int-quantized layers (None without): transformers loads it, vLLM does not, and
    their 4-bit codes take a byte each (the native checkpoint packs two), with the way to a packed export."""
    names = summary.int_quantized
    if not names:
        return None
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    size = ("; their 4-bit codes take a byte each, so these layers are larger than in the native checkpoint"
            if any(model.get_submodule(n).bits < 8 for n in names) else "")
    return (f"{len(names)} layer{'s' if len(names) != 1 else ''} written int-quantized ({listed}): asymmetric codes, "
            "one per byte (transformers cannot load compressed-tensors' packed asymmetric layout). transformers loads "
            f"this export, vLLM does not (it builds weight-only int layers from pack-quantized only){size}. For a "
            "packed export vLLM loads, quantize with symmetric: true")


def vllm_fusion_note(model: nn.Module, summary: ExportSummary) -> str | None:
    """The note on an export whose q/k/v (or gate/up) of one layer are stored in different schemes (quantized at
    other bits or groups, or some dense): vLLM fuses them (SAME_INPUT_LINEARS; Mixtral's w1/w3 and DeepSeek's fused
    projections are not checked) and refuses the checkpoint ("vLLM requires all to use the same scheme");
    transformers loads it. None when every fused group agrees."""
    quantized = set(summary.quantized)
    names = [name for name, _ in model.named_modules()]
    present = set(names)

    def scheme(name: str):
        module = model.get_submodule(name)
        return (*_scheme_key(module), storage_format(module)) if name in quantized else "dense"

    mixed = []
    for parent in names:
        for shards in SAME_INPUT_LINEARS:
            group = [f"{parent}.{shard}" if parent else shard for shard in shards]
            if all(n in present for n in group) and any(n in quantized for n in group) \
                    and len({scheme(n) for n in group}) > 1:
                mixed.append(f"{parent}.{'/'.join(shards)}")
    summary.vllm_mixed_fused = mixed
    if not mixed:
        return None
    listed = ", ".join(mixed[:2]) + (f" and {len(mixed) - 2} more" if len(mixed) > 2 else "")
    return (f"vLLM fuses q/k/v and gate/up into one layer each and requires one scheme for them; {listed} "
            "mix schemes (other bits or groups, or quantized beside dense): transformers loads this export, vLLM "
            "refuses it. Quantize the fused projections alike for vLLM")


def _scheme(module, targets: list[str], fmt: str | None = None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    channel = module.group_size >= module.in_features
    weights = QuantizationArgs(num_bits=module.bits, type="int", symmetric=module.symmetric,
                               strategy="channel" if channel else "group",
                               group_size=None if channel else module.group_size)
    return QuantizationScheme(targets=targets, weights=weights, format=fmt)


def _scheme_key(module) -> tuple:
    channel = module.group_size >= module.in_features
    return module.bits, None if channel else module.group_size, module.symmetric


@torch.no_grad()
def quantized_tensors(name: str, module, storage_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one QuantizedLinear (local names), written by compressed-tensors' own
    compressor from our codes, then decompressed by it again to check that nothing was requantized."""
    from compressed_tensors.compressors import BaseCompressor

    scheme = _scheme(module, ["Linear"])
    compressor = BaseCompressor.get_value_from_registry(storage_format(module))
    local = {"weight": module.dequantized_weight(torch.float32), "weight_scale": module.scales().to(storage_dtype)}
    if not module.symmetric:  # compressed-tensors keeps asymmetric codes and zero points signed
        offset = 2 ** (module.bits - 1)
        local["weight_zero_point"] = (module.zero_points().to(torch.int16) - offset).to(torch.int8)
    out = {k: v.contiguous() for k, v in compressor.compress(local, scheme).items()}
    check = compressor.decompress({**out, "weight_scale": out["weight_scale"].float()}, scheme)["weight"]
    if not torch.equal(check.float(), local["weight"]):
        raise ExportError(f"{name}: compressed-tensors would not reproduce this layer's weights; export it natively")
    if module.bias is not None:
        out["bias"] = module.bias.detach().to(storage_dtype)
    return out


def check_plan(model: nn.Module, summary: ExportSummary | None = None) -> dict[str, nn.Module]:
    """`_plan`, refusing an export whose every quantized layer would be stored dense. Works on a meta model (the
    layers' shapes and group sizes only): `compress export` asks it before reading any weight."""
    summary = summary if summary is not None else ExportSummary()
    compressed = _plan(model, summary)
    if summary.dense_fallback and not summary.quantized:  # (pruned ones too: dense float32 with zeros)
        raise ExportError(_all_dense(summary.dense_fallback))
    return compressed


def _plan(model: nn.Module, summary: ExportSummary) -> dict[str, nn.Module]:
    """The compressed modules by name, what each will be stored as noted in `summary` (quantized, or dense for a
    width that is not whole groups); ExportError, before any work, on a module compressed-tensors cannot express."""
    from ..inspection import _is_compressed

    compressed = {}
    for name, module in model.named_modules():
        if not _is_compressed(module):
            continue
        if _is_quantized(module):
            if module.in_features % module.group_size:
                summary.dense_fallback[name] = _fallback_reason(module.in_features, module.group_size)
            else:
                summary.quantized.append(name)
                if storage_format(module) not in VLLM_WEIGHT_ONLY_FORMATS:
                    summary.int_quantized.append(name)
        elif not isinstance(module, SparseLinear):
            raise ExportError(f"{name} is a {type(module).__name__}, which --format {FORMAT} cannot express; "
                              "use the native format (the default)")
        compressed[name] = module
    return compressed


def _module_tensors(name: str, module, storage_dtype: torch.dtype, summary: ExportSummary):
    """(one compressed module's exported tensors by local name, its keep mask or None, its (N, M) or None)."""
    if isinstance(module, SparseLinear):
        out = {"weight": module.dense_weight(storage_dtype)}
        mask, nm = out["weight"] != 0, (module.n, module.m) if module.format == "nm" else None
    else:
        mask, nm = module.sparsity_mask(), module.sparsity_structure
        if name not in summary.dense_fallback:
            return quantized_tensors(name, module, storage_dtype), mask, nm
        # float32: code x scale needs more mantissa than bf16 has, and a loader rounds it once to what it computes in
        # (bf16, fp16, or float32 exactly as compress computes it); at twice a bf16 layer's bytes, said in the note
        out = {"weight": module.dequantized_weight(torch.float32)}
    if module.bias is not None:
        out["bias"] = module.bias.detach().to(storage_dtype)
    return out, mask, nm


def _stream_state(model: nn.Module, storage_dtype: torch.dtype, summary: ExportSummary,
                  compressed: dict[str, nn.Module], progress: bool):
    """(name, tensor) pairs of the export in the model's order, each compressed module's tensors made when the
    writer reaches it (so an export holds one shard, not a second copy of the model); the sparsity statistics land in
    `summary` once the last pair is taken."""
    from ..checkpoint import _unique_state_dict
    from ..progress import Ticker

    structures, zeros, total, done = set(), 0, 0, set()
    ticker = Ticker(f"exporting {len(compressed)} compressed layers", total=len(compressed)) if progress else None
    try:
        for key, t in _unique_state_dict(model, storage_dtype).items():
            owner = key.rpartition(".")[0]
            if owner not in compressed:
                if key.endswith(".weight") and getattr(model.get_submodule(owner), "compress_pruned", False):
                    # pruned, stored dense (storage: dense, or auto at low sparsity): its zeros are the mask
                    mask = t != 0
                    summary.sparse.append(owner)
                    structures.add(_nm_label(mask))
                    zeros, total = zeros + int((~mask).sum()), total + mask.numel()
                yield key, t
            elif owner not in done:
                done.add(owner)
                tensors, mask, nm = _module_tensors(owner, compressed[owner], storage_dtype, summary)
                if mask is not None:
                    summary.sparse.append(owner)
                    structures.add(f"{nm[0]}:{nm[1]}" if nm else "unstructured")
                    zeros, total = zeros + int((~mask).sum()), total + mask.numel()
                del mask
                yield from ((f"{owner}.{k}", v) for k, v in tensors.items())
                if ticker is not None:
                    ticker.advance()
    finally:
        if ticker is not None:
            ticker.close()
    if structures:
        summary.sparsity_structure = structures.pop() if len(structures) == 1 else "unstructured"
    summary.global_sparsity = zeros / max(total, 1)


def _nm_label(mask: torch.Tensor) -> str:
    """"2:4" or "4:8" where every group keeps at most that many (a group may keep fewer: zeros of an earlier prune),
    else "unstructured": the structure of a pruned layer stored dense, read from its zeros."""
    rows, cols = mask.shape
    for n, m in ((2, 4), (4, 8)):
        if cols % m == 0 and bool((mask.reshape(rows, cols // m, m).sum(-1) <= n).all()):
            return f"{n}:{m}"
    return "unstructured"


def _sparsity_metadata(model: nn.Module, summary: ExportSummary) -> dict | None:
    """compressed-tensors' description of weights stored dense with zeros (`DenseSparsityConfig`). Kept in the
    `compression.export` provenance, not in `quantization_config`: vLLM >= 0.19.1 refuses a quantization_config
    whose `sparsity_config` names targets ("Sparsity support has been removed from compressed-tensors")."""
    from compressed_tensors.config import DenseSparsityConfig

    if not summary.sparse:
        return None
    return DenseSparsityConfig(targets=summary.sparse, global_sparsity=round(summary.global_sparsity, 6),
                               sparsity_structure=summary.sparsity_structure).model_dump()


def _quantization_config(model: nn.Module, summary: ExportSummary):
    """compressed-tensors' QuantizationConfig of the quantized layers (None when there are none): one config group
    per (bits, group size, symmetric) scheme."""
    from compressed_tensors.quantization import QuantizationConfig

    groups: dict[tuple, list[str]] = {}
    for name in summary.quantized:
        groups.setdefault(_scheme_key(model.get_submodule(name)), []).append(name)
    if not groups:
        return None
    one = len(groups) == 1
    formats = {storage_format(model.get_submodule(names[0])) for names in groups.values()}
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    # each scheme names its format: transformers' loader infers a missing one from the scheme alone
    # (pack-quantized for any int weights), whatever the config-level `format` says
    schemes = {f"group_{i}": _scheme(model.get_submodule(names[0]), ["Linear"] if one else names,
                                     storage_format(model.get_submodule(names[0])))
               for i, names in enumerate(groups.values())}
    # transformers builds nn.Linear layers: with the class name as target, every other Linear must be ignored
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, SparseLinear)) or _is_quantized(m)]
    ignore = [n for n in linears if n not in summary.quantized] if one else []
    summary.format = fmt
    return QuantizationConfig(config_groups=schemes, format=fmt, ignore=ignore,
                              quantization_status="compressed")


def export(model: nn.Module, folder: str | Path, *, tokenizer=None, recipe_text: str | None = None,
           report: dict | None = None, overwrite: bool = False,
           max_shard_bytes: int | str | None = None, progress: bool = False) -> ExportSummary:
    """Write `model` (compressed by prune and/or quantize) as a compressed-tensors checkpoint at `folder`,
    atomically, sharded above `max_shard_bytes` as a native checkpoint is; each layer is converted (and checked
    against compressed-tensors' decompression) as its shard is written, with a progress bar when `progress`. Fails
    with ExportError, leaving nothing at `folder`, on what compressed-tensors cannot express."""
    from ..checkpoint import (DEFAULT_MAX_SHARD_BYTES, _portable_source, _source_folder, compression_record,
                              write_companions, write_folder, write_weights)
    from ..models import checkpoint_dtype

    from ..offload import parse_bytes

    shard_bytes = (DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None
                   else parse_bytes(max_shard_bytes, "max_shard_bytes"))
    _require_package()
    section = getattr(model.config, "compression", None) or compression_record([], recipe_text, None)
    check_passes([(e["pass"], e.get("args") or {}) for e in section.get("passes", [])])
    if any(t.device.type == "meta" for t in model.state_dict().values()):
        raise ExportError("compressed-tensors export needs every layer in memory; this model keeps layers on disk "
                          "(max_memory): save it natively (compress.save), or load it without max_memory")
    dtype = checkpoint_dtype(model)
    summary = ExportSummary()
    # before any work; a later error (a layer that would not round-trip) removes the temporary folder (write_folder)
    compressed = check_plan(model, summary)
    notes = (int_quantized_note(model, summary), vllm_fusion_note(model, summary))
    summary.note = " ".join(n for n in notes if n) or None
    quantization = _quantization_config(model, summary)

    def write(tmp: Path) -> None:
        from compressed_tensors.compressors import ModelCompressor

        stream = _stream_state(model, dtype, summary, compressed, progress)
        try:
            write_weights(stream, tmp, shard_bytes)
        finally:  # an error in the writer: the progress bar closes now, not when the traceback is freed
            stream.close()
        config = model.config.to_dict()
        config["dtype"] = str(dtype).removeprefix("torch.")
        config["architectures"] = [type(model).__name__]
        # provenance; compress.load reads a folder with `export_format` through transformers (models.load)
        config["compression"] = {**_portable_source(section, tmp), "export_format": FORMAT,
                                 "export": summary.to_dict(), "sparsity": _sparsity_metadata(model, summary)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        # `quantization_config` written by compressed-tensors itself, as llm-compressor's save does
        ModelCompressor(quantization_config=quantization).update_config(str(tmp))
        write_companions(model, tmp, tokenizer, recipe_text,
                         None if report is None else {**report, "export": summary.to_dict()})

    write_folder(folder, write, overwrite=overwrite, source=_source_folder(model))
    return summary

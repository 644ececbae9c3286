"""The one-call API: `compress.apply(model, recipe_or_passes)` runs the passes in order and records them in the
model's config (the checkpoint's `compression` section)."""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from pydantic import ValidationError
import torch
from torch import nn

from .calibration import CalibrationSpec, batches_hash
from .checkpoint import compression_record, round_to_storage
from .errors import CalibrationError, CompressError, ConfigError, UnsupportedModelError
from .heap import release_freed_heap
from .inspection import stored_bytes
from .models import check_token_ids, checkpoint_dtype
from .pass_api import Pass, PassContext, PassReport, format_validation_error, tensor_bytes
from .progress import phase
from .save_pretrained import route_save_pretrained


@dataclass
class ApplyReport:
    """`bytes_*`: the whole model's tensors in memory (parameters and buffers at the compute dtype, e.g. a packed
    layer's int64 row offsets too); `stored_bytes_*`: what its checkpoint holds, at the storage dtype."""
    passes: list[PassReport] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    stored_bytes_before: int | None = None
    stored_bytes_after: int | None = None
    calibration_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "stored_bytes_before": self.stored_bytes_before, "stored_bytes_after": self.stored_bytes_after,
            "calibration_hash": self.calibration_hash, "passes": [p.to_dict() for p in self.passes],
        }


def check_offload_support(passes: Sequence[Pass]) -> None:
    """Refuse passes that cannot run with decoder layers left on disk (max_memory)."""
    unable = [repr(p.name) + (f" ({p.offload_hint})" if p.offload_hint else "") for p in passes
              if not p.supports_offload]
    if unable:
        raise CompressError(f"{'passes' if len(unable) > 1 else 'pass'} {', '.join(unable)} cannot run "
                            "with decoder layers left on disk "
                            "(max_memory): load the model without max_memory, or on a machine that holds it")


# packages whose layers hold weights another tool quantized (loaded by transformers from such a folder)
_FOREIGN_QUANTIZED = ("bitsandbytes.", "compressed_tensors.", "auto_gptq.", "gptqmodel.", "awq.", "optimum.",
                      "hqq.")


def check_not_quantized_elsewhere(model: nn.Module) -> None:
    """Refuse a model whose weights another tool compressed: layers of a quantization package (a bitsandbytes folder
    written by transformers), or a compressed-tensors export (which transformers loads into plain-looking layers).
    The passes read plain weights or compress's own modules, and a checkpoint saved from those layers would not
    match its config. compress's own bitsandbytes layers live in compress.quantize, and pass."""
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = str(getattr(method, "value", method) or "")
    foreign = sorted({type(m).__module__.split(".")[0] for m in model.modules()
                      if type(m).__module__.startswith(_FOREIGN_QUANTIZED)})
    source = getattr(model, "compress_source", None) or "the model"
    section = getattr(model.config, "compression", None)
    exported = section.get("export_format") if isinstance(section, dict) else None
    if method == "compressed-tensors" or exported:
        # (a pruned-only export loads as plain dense layers, yet its record names packed tensors: a checkpoint
        # written on top of it matched neither)
        raise CompressError(f"{source} is a {exported or method} export (for vLLM/transformers): compress's passes "
                            "start from unquantized weights or its own checkpoints; apply the recipe to the original "
                            "model (or to the native checkpoint)")
    if foreign:
        raise CompressError(f"{source} holds layers quantized by {', '.join(foreign)}: compress's passes start from "
                            "unquantized weights or its own checkpoints; apply the recipe to the original model "
                            "(or to the native checkpoint)")


def _check_model(model) -> None:
    """A transformers causal LM with real weights (a name or a bare module is a mistake said in one line)."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise CompressError(f"apply() takes a model from compress.load(...) (a transformers causal LM), got "
                            f"{type(model).__name__}")
    from .models import SUPPORTED_MODEL_TYPES

    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:  # (the work and the save went through; compress.load then refused it)
        raise UnsupportedModelError(f"model type {model_type!r} is not supported; supported: "
                                    f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if not getattr(model, "compress_offloaded_layers", None) and any(p.is_meta for p in model.parameters()):
        # (an offloaded model's layers on disk are meta tensors behind accelerate's hooks: those are fine)
        raise CompressError("the model is on the meta device (meta=True is for --dry-run's checks): load it without "
                            "meta to compress it")


def _check_finite_weights(model: nn.Module) -> None:
    """NaN or inf weights went through every pass unseen: quantization scales of NaN mapped to 1 (groups silently
    zero), Hessians and masks of NaN; the checkpoint written looked like any other."""
    from .models import describe_nonfinite, nonfinite_weights

    # (the layers left on disk were counted as they were read: the scan sees only meta tensors there)
    bad = nonfinite_weights(model) + list(getattr(model, "compress_nonfinite_on_disk", []))
    if bad:
        raise CompressError(f"the model holds {describe_nonfinite(bad)}: the checkpoint is damaged (or a float16 "
                            "cast overflowed); a compressed copy would carry them silently")


def _check_no_foreign_lora(model: nn.Module) -> None:
    """LoRA layers injected by PEFT outside a recover pass (inject_adapter_in_model, transformers' add_adapter):
    their lora_A / lora_B were quantized as layers of the model. A recover pass's unmerged adapter has its own
    refusals (Pass.check_after), naming the recipe's fix."""
    from .recover.lora import unmerged_adapter_layers

    foreign = next((n for n, m in model.named_modules() if type(m).__module__.startswith("peft.")), None)
    if foreign is not None and not unmerged_adapter_layers(model):
        raise CompressError(f"the model holds PEFT LoRA layers ({foreign}): merge them into the weights first "
                            "(merge_and_unload(), or unload them); to train LoRA after compressing, add a recover "
                            "pass")


def check_calibration(model: nn.Module, passes: Sequence[Pass], ctx: PassContext) -> None:
    """Passes that need calibration data have it, and it reads: unreadable, too short or foreign-vocabulary text
    fails before any work (`apply`, and `compress apply --dry-run` on a meta model: only its config is read)."""
    needy = [p for p in passes if p.needs_calibration_for()]
    if needy and ctx.calibration is None:
        raise CalibrationError(f"pass {needy[0].name!r} with these arguments needs calibration data: add a "
                               "`calibration:` section to the recipe (e.g. `calibration: {source: builtin:calibration}`), "
                               "or from Python pass calibration={'source': 'builtin:calibration'} to compress.apply")
    if needy:
        check_calibration_memory(model, needy, ctx)  # before the text is read: a huge num_samples took hours there
        check_token_ids(ctx.calibration_batches(f"pass {needy[0].name!r}"), model.config, "calibration",
                        "lower calibration.seq_len", where=getattr(ctx.calibration, "_location", ""))
    for p in passes:
        p.located(lambda: p.check_with_calibration(model, ctx))


def check_calibration_memory(model: nn.Module, passes: Sequence[Pass], ctx: PassContext) -> None:
    """A CalibrationError when a pass's calibration (`Pass.calibration_bytes`: layer-by-layer passes hold every
    window's hidden states) would not fit in the compute device's free memory: it swapped or was killed hours in."""
    from .environment import setting
    from .sequential import free_bytes

    if setting("COMPRESS_MEMORY_CHECK") == "off":
        return
    need, name = max(((p.calibration_bytes(model, ctx.calibration), p.name) for p in passes), key=lambda t: t[0])
    free = free_bytes(ctx.device) if need else None
    if free is not None and need > free:
        spec = ctx.calibration
        raise CalibrationError(f"calibration: pass {name!r} would hold {need / 1e9:.2f} GB at num_samples "
                               f"{spec.num_samples} x seq_len {spec.seq_len} (every window's hidden states in and out "
                               f"of a layer), more than the {free / 1e9:.2f} GB free on {ctx.device}: lower "
                               "num_samples or seq_len (e.g. 128 x 2048, the papers' setting), or set "
                               "COMPRESS_MEMORY_CHECK=off to run it anyway (swap)")


def apply(
    model: nn.Module,
    recipe_or_passes,
    *,
    calibration: CalibrationSpec | dict | None = None,
    tokenizer=None,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[nn.Module, ApplyReport]:
    """Apply a `Recipe` or a list of `Pass` instances to `model` in place; returns (model, report). The caller's
    random state (torch, CUDA, `random`, numpy) is as it was: passes seed their own work (recover's Trainer reseeded
    all of them)."""
    from .models import check_device, unwrapped
    from .recipe import Recipe

    given, model = model, unwrapped(model, "apply()")  # (a torch.compile'd model: the compiled forward follows)

    recipe_text, base_dir, export_format = None, None, None
    if isinstance(recipe_or_passes, Recipe):
        export_format = recipe_or_passes.export_format
        passes: Sequence[Pass] = recipe_or_passes.build_passes()
        calibration = calibration or recipe_or_passes.calibration
        recipe_text = recipe_or_passes.text
        base_dir = recipe_or_passes.base_dir
    elif isinstance(recipe_or_passes, Pass):
        passes = [recipe_or_passes]
    else:
        iterable = hasattr(recipe_or_passes, "__iter__") and not isinstance(recipe_or_passes, (str, bytes, dict, type))
        passes = list(recipe_or_passes) if iterable else [None]
        if not all(isinstance(p, Pass) for p in passes):  # (an empty list: no passes, the model as it is)
            raise CompressError("apply() takes a Recipe or a list of Pass instances (e.g. compress.passes.Prune(...)), "
                                f"got {recipe_or_passes!r:.80}")
    _check_model(model)
    _check_no_foreign_lora(model)
    check_device(device)
    once = next((p.name for i, p in enumerate(passes) if p.once_per_model and
                 any(q.name == p.name for q in passes[:i])), None)
    if once:  # the second would find the first's modules (a half-applied model), or its setting would silently win
        raise ConfigError(f"{once} appears twice: a model takes it once; keep one {once} pass")
    if calibration is not None and not isinstance(calibration, (dict, CalibrationSpec)):
        raise CompressError(f"calibration= takes a dict such as {{'source': 'builtin:calibration'}}, got "
                            f"{calibration!r:.80}")
    if tokenizer is not None and (isinstance(tokenizer, (str, bytes, os.PathLike))  # str has .encode too
                                  or not callable(getattr(tokenizer, "encode", None))
                                  # a raw tokenizers.Tokenizer failed deep in calibration (no eos_token_id)
                                  or not callable(tokenizer) or not hasattr(tokenizer, "eos_token_id")):
        raise CompressError(f"tokenizer= takes a tokenizer (compress.load_tokenizer(...)), got {tokenizer!r:.80}")
    if isinstance(calibration, (dict, CalibrationSpec)):  # a spec's fields assigned since it was built: checked again
        try:
            checked = CalibrationSpec(**(calibration if isinstance(calibration, dict) else calibration.model_dump()))
            if isinstance(calibration, CalibrationSpec):
                checked._location = calibration._location  # (the recipe line its errors name)
            calibration = checked
        except ValidationError as exc:
            raise ConfigError(format_validation_error("calibration", exc).replace("pass 'calibration'", "calibration")) from None
    if tokenizer is None and getattr(model, "compress_source", None):
        from .models import load_tokenizer

        tokenizer = load_tokenizer(model.compress_source, strict=False)  # needed only by calibration
    ctx = PassContext(calibration=calibration, tokenizer=tokenizer, device=device, progress=progress,
                      base_dir=base_dir,
                      calibration_sketch=(getattr(model.config, "compression", None) or {}).get("calibration_sketch"))
    check_not_quantized_elsewhere(model)
    with phase("checking that the weights are finite", enabled=progress):
        _check_finite_weights(model)
    if getattr(model, "compress_offloaded_layers", None):
        check_offload_support(passes)
    for i, p in enumerate(passes):
        p.checked(model, passes[:i])  # shapes a pass cannot take fail before any pass runs, at their recipe line
    check_calibration(model, passes, ctx)
    if any(p.needs_original_model_for() for p in passes):
        # e.g. the teacher of a distillation loss: the model before the first pass, frozen, on the CPU
        ctx.original_model = copy.deepcopy(model).cpu().eval().requires_grad_(False)

    report = ApplyReport(bytes_before=tensor_bytes(model))
    previous = getattr(model.config, "compression", None) or {}
    entries = list(previous.get("passes", []))
    storage = checkpoint_dtype(model)
    stored = report.stored_bytes_before = stored_bytes(model, storage)
    for p in passes:
        # a mistake only the earlier passes' result shows (e.g. MoM's new modules) also names its recipe line
        with caller_random_state(device):
            r = p.located(lambda: p.apply(model, ctx))
        if not isinstance(r, PassReport):
            raise CompressError(f"pass {p.name!r}: apply() returned {type(r).__name__}, not a PassReport (return "
                                "compress.PassReport(name=self.name, modules=[...]) naming what it changed)")
        r.stored_bytes_before, stored = stored, stored_bytes(model, storage)
        note = _default_ignore_dropped(p, r)
        if note:
            r.notes.append(note)
        r.stored_bytes_after = stored
        for earlier, earlier_report in zip(passes, report.passes):
            note = earlier.note_on_later(model, p, r)
            if note and note not in earlier_report.notes:
                earlier_report.notes.append(note)
        report.passes.append(r)
        entries.append(p.entry(r))
    round_to_storage(model, storage)  # the model in memory computes what its checkpoint will hold
    report.bytes_after, report.stored_bytes_after = tensor_bytes(model), stored
    report.calibration_hash = batches_hash(ctx._batches) if ctx._batches is not None else previous.get("calibration_hash")
    source = previous.get("source_model") or getattr(model, "compress_source", None)
    model.config.compression = compression_record(entries, recipe_text, report.calibration_hash, source,
                                                  calibration_sketch=ctx.calibration_sketch)
    route_save_pretrained(model)  # transformers' own wrote a folder plain transformers loaded silently wrong
    # the recipe's `export: {format: ...}`, which compress.save writes by default: the last apply's request (a
    # later recipe without one, or passes in code, clear an earlier one)
    model.compress_export_format = export_format
    ctx = None  # its calibration batches and teacher: then the layers the passes replaced go back to the system
    release_freed_heap()
    return given, report


@contextlib.contextmanager
def caller_random_state(device: str = "cpu"):
    """Restore torch's (CPU and CUDA devices': those initialized, or all when the passes compute on CUDA, which seeds
    them), `random`'s and numpy's random state on the way out."""
    import random

    import numpy as np

    py, np_state = random.getstate(), np.random.get_state()
    cuda = torch.cuda.is_initialized() or (str(device).startswith("cuda") and torch.cuda.is_available())
    devices = list(range(torch.cuda.device_count())) if cuda else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


def _default_ignore_dropped(p, report) -> str | None:
    """A pass given its own `ignore` no longer leaves out what the default one does (the head, the embeddings): when
    it compressed one of those, its report says why (an ignore naming one layer pruned the lm_head, silently)."""
    from .targets import DEFAULT_IGNORE, is_class_pattern, pattern_matcher

    field = type(p.config).model_fields.get("ignore")
    if field is None or "ignore" not in p.config.model_fields_set or field.default_factory is None:
        return None
    if list(field.default_factory()) != list(DEFAULT_IGNORE) or all(d in p.config.ignore for d in DEFAULT_IGNORE):
        return None
    defaults = [pattern_matcher(d) for d in DEFAULT_IGNORE]
    # those a class name (Linear) picked up: a head the targets name or a regex matches was asked for
    named = [pattern_matcher(t) for t in getattr(p.config, "targets", []) if not is_class_pattern(t)]
    hit = [m for m in report.modules if any(fn(m, None) for fn in defaults) and not any(fn(m, None) for fn in named)]
    if not hit:
        return None
    return (f"{', '.join(hit)} {'was' if len(hit) == 1 else 'were'} compressed too: this pass's ignore replaces the "
            f"default one ({', '.join(DEFAULT_IGNORE)}); add those patterns to keep them as they are")

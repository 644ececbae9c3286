"""The `quantize` pass: glue between recipes and the math in int_quant.py, gptq.py and bnb.py.

- `gptq` (calibrated) and `rtn` (round-to-nearest, no data): integer weights, 4 or 8 bits, group scales, stored in
  `QuantizedLinear`. GPTQ runs through the sequential runner: per decoder layer, forward hooks accumulate each
  targeted Linear's input Hessian (compress/hessian.py, shared with SparseGPT), the layer is quantized, and its
  quantized outputs feed the next layer. A layer pruned before (a `SparseLinear`, e.g. by `prune` with 2:4) keeps
  its zeros and its pattern; the result stores the kept codes packed (N:M) or a bitmask.
- `nf4` / `fp4` / `int8`: bitsandbytes' quantization (blockwise 4-bit, or LLM.int8 with its outlier threshold), in
  modules whose checkpoint tensors and config.json `quantization_config` are those transformers' bitsandbytes
  integration writes, so such a checkpoint loads with `AutoModelForCausalLM.from_pretrained` and no code of ours.
  Pruned layers are skipped (bitsandbytes has no sparse layout) and reported."""
from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from pydantic import Field, field_validator
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..hessian import HessianAccumulator, check_calibration_inputs, input_statistics
from ..models import DTYPES, checkpoint_dtype
from ..pass_api import (UNTIED_NOTE, Pass, PassConfig, PassContext, PassReport, left_by_earlier, replace_module,
                        tensor_bytes, timed, untie_output_head)
from ..prune.packing import dense_pruned_mask
from ..prune.sparse_linear import SparseLinear
from ..registry import register_pass
from ..sequential import modules_in_layer
from ..targets import match_modules
from .bnb import Bnb4bitLinear, Bnb8bitLinear, require_bitsandbytes
from .gptq import gptq_quantize
from .int_quant import quantize_rtn
from .quantized_linear import QuantizedLinear, nm_kept_mask, zero_where_pruned

BNB_METHODS = ("nf4", "fp4", "int8")
INT_OPTIONS = ("bits", "group_size", "symmetric", "act_order", "blocksize", "dampening")
BNB_OPTIONS = {"nf4": ("bnb_blocksize", "double_quant", "compute_dtype"), "int8": ("threshold",)}
BNB_OPTIONS["fp4"] = BNB_OPTIONS["nf4"]


# why a layer the targets match is skipped (the run's report, and --dry-run's plan before it runs)
_ALREADY_QUANTIZED = "already quantized"
_PACKED_FOR_BNB = "pruned (bitsandbytes stores dense weights only; use method gptq or rtn)"


def _bnb_family(method: str) -> str | None:
    """Which bitsandbytes kind a quantize method writes: "4-bit" (nf4/fp4), "8-bit" (int8), or None (not bnb)."""
    return None if method not in BNB_METHODS else ("8-bit" if method == "int8" else "4-bit")


@register_pass("quantize")
class Quantize(Pass):
    """Quantize Linear weights: GPTQ / round-to-nearest int4/int8 with group scales, or bitsandbytes NF4/FP4/int8."""

    @property
    def supports_offload(self) -> bool:  # GPTQ through the sequential runner, RTN through for_each_layer
        return self.config.method in ("gptq", "rtn")

    @property
    def offload_hint(self) -> str:
        return f"method {self.config.method}: of its methods only gptq and rtn run layer by layer"

    class Config(PassConfig):
        method: Literal["gptq", "rtn", "nf4", "fp4", "int8"] = "gptq"
        bits: Literal[4, 8] = Field(4, description="gptq/rtn: bits per weight")
        group_size: int = Field(128, description="gptq/rtn: input columns per scale (-1: one per output row); "
                                                 "clamped to each layer's input width")
        symmetric: bool = Field(True, description="gptq/rtn: signed codes, no zero point")
        act_order: bool = Field(False, description="gptq: visit columns by decreasing Hessian diagonal")
        blocksize: int = Field(128, ge=1, description="gptq: columns per lazy-update block")
        dampening: float = Field(0.01, gt=0.0, description="gptq: dampening, fraction of mean diag(H)")
        bnb_blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
            64, description="nf4/fp4: weights per absmax block")
        double_quant: bool = Field(True, description="nf4/fp4: quantize the absmax scales too (8 bits)")
        compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
            "float32", description="nf4/fp4: matmul dtype (bnb_4bit_compute_dtype)")
        threshold: float = Field(6.0, ge=0.0, description="int8: LLM.int8 outlier threshold on activations (0: off)")

        @field_validator("group_size")
        @classmethod
        def _group(cls, value):
            if value != -1 and value < 1:
                raise ValueError(f"group_size is a positive number of input columns, or -1 for one group per row; "
                                 f"got {value}")
            return value

    def _foreign_options(self) -> tuple[set[str], set[str]]:
        """(the options of this method, those of the other methods)."""
        c = self.config
        allowed = set(BNB_OPTIONS[c.method]) if c.method in BNB_METHODS else set(INT_OPTIONS) - (
            set() if c.method == "gptq" else {"act_order", "blocksize", "dampening"})
        return allowed, (set(INT_OPTIONS) | {o for v in BNB_OPTIONS.values() for o in v}) - allowed

    def entry(self, report: PassReport | None = None) -> dict[str, Any]:
        """The record without other methods' options (at their defaults, validate_config made sure): an nf4 run
        listed bits=4, group_size=128, act_order ... in config.json and `inspect`."""
        out = super().entry(report)
        foreign = self._foreign_options()[1]
        out["args"] = {k: v for k, v in out["args"].items() if k not in foreign}
        return out

    def validate_config(self) -> None:
        c = self.config
        allowed, others = self._foreign_options()
        # an option of another method, set to something else than its default
        foreign = sorted(o for o in others if getattr(c, o) != type(c).model_fields[o].default)
        if foreign:
            raise ConfigError(f"quantize method {c.method!r} does not take {', '.join(foreign)}; "
                              f"its options: {', '.join(sorted(allowed)) or 'none'}")

    def needs_calibration_for(self) -> bool:
        return self.config.method == "gptq"

    def calibration_bytes(self, model: nn.Module, calibration) -> int:
        from ..sequential import calibration_bytes

        return calibration_bytes(model, calibration.num_samples, calibration.seq_len, self._targets(model)[0],
                                 hessians=True) if self.needs_calibration_for() else 0

    # ---------------------------------------------------------------------------------------------- targets
    def _targets(self, model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
        """(modules to quantize, {module: why skipped}). The class name `Linear` also selects pruned Linear layers."""
        c = self.config
        matched = self.target_modules(model)
        if "Linear" in c.targets:  # and the quantized ones, to say they are skipped (they were left out silently)
            matched.update(match_modules(model, ["SparseLinear", "QuantizedLinear", "Bnb4bitLinear", "Bnb8bitLinear"],
                                         c.ignore, require_all=False))
            matched = {n: m for n, m in model.named_modules() if n in matched}  # model order
        targets, skipped = {}, {}
        for name, module in matched.items():
            if isinstance(module, nn.Linear) or (isinstance(module, SparseLinear) and c.method not in BNB_METHODS):
                targets[name] = module
            elif isinstance(module, SparseLinear):
                skipped[name] = _PACKED_FOR_BNB
            elif isinstance(module, (QuantizedLinear, Bnb4bitLinear, Bnb8bitLinear)):
                skipped[name] = _ALREADY_QUANTIZED
            elif name in c.targets:
                raise ConfigError(f"quantize targets Linear layers; {name} is a {type(module).__name__}: name its "
                                  "Linear layers or use a pattern like 're:.*mlp\\..*'")
        if not targets:
            raise ConfigError(f"quantize: targets {c.targets} match no Linear layer"
                              + (f" ({len(skipped)} skipped: {next(iter(skipped.values()))})" if skipped else ""))
        return targets, skipped

    def describe(self, model: nn.Module) -> list[str]:
        return list(self._targets(model)[0])

    def taken_by(self, earlier: Pass, model: nn.Module) -> str | None:
        if earlier.name == "quantize":
            return _ALREADY_QUANTIZED
        if self.config.method in BNB_METHODS and earlier.name == "prune" and earlier.stores_packed(model):
            return _PACKED_FOR_BNB
        return None

    def check_after(self, model: nn.Module, earlier) -> None:
        """Layers an earlier quantize pass replaces are skipped here, and bitsandbytes skips those an earlier prune
        packs: when that leaves no layer, the run would stop only after the earlier passes ran. Said here, before
        any work (and by --dry-run)."""
        if not left_by_earlier(model, self.describe(model), earlier, lambda p: p.name == "quantize"):
            raise ConfigError("quantize: every layer the targets match is quantized by an earlier quantize pass: "
                              "quantize each layer once")
        self._check_one_bnb_family(model, earlier)
        if self.config.method in BNB_METHODS and not left_by_earlier(
                model, self.describe(model), earlier, lambda p: p.name == "prune" and p.stores_packed(model)):
            raise ConfigError(f"quantize (method {self.config.method}): every layer the targets match is stored "
                              "packed by an earlier prune pass, and bitsandbytes stores dense weights only: use method "
                              "gptq or rtn after prune (they keep the zeros), or prune with storage: dense")

    def _check_one_bnb_family(self, model: nn.Module, earlier) -> None:
        """transformers reads one `quantization_config` per model and builds every quantized layer from it: 4-bit
        (nf4/fp4) and 8-bit bitsandbytes layers in one checkpoint loaded as the last pass's kind, the others' tensors
        unexpected and the forward broken (compress.load read it fine, so nothing said so)."""
        family = _bnb_family(self.config.method)
        if family is None:
            return
        others = {_bnb_family(p.config.method) for p in earlier if p.name == "quantize"}
        others |= {"4-bit" if isinstance(m, Bnb4bitLinear) else "8-bit" for m in model.modules()
                   if isinstance(m, (Bnb4bitLinear, Bnb8bitLinear))}
        others.discard(None)
        if others - {family}:
            raise ConfigError(f"quantize (method {self.config.method}): the model already has {others.pop()} "
                              "bitsandbytes layers, and transformers loads one bitsandbytes kind per model (its "
                              "quantization_config): quantize every layer with nf4/fp4, or every layer with int8")

    # ---------------------------------------------------------------------------------------------- apply
    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        from ..sequential import decoder_layers, for_each_layer, modules_in_layer

        c = self.config
        if c.method in BNB_METHODS:
            require_bitsandbytes()
        targets, skipped = self._targets(model)
        report = PassReport(name=self.name, modules=list(targets), skipped=skipped)
        report.bytes_before = sum(tensor_bytes(m) for m in targets.values())
        restore: dict[str, dict] = {}
        notes: dict[str, str] = {}
        label = f"quantize ({c.method})"
        if c.method == "gptq":  # before anything changes (the head untied below)
            prefix, _ = decoder_layers(model)
            outside = [n for n in targets if not n.startswith(prefix + ".")]
            if outside:
                raise ConfigError(f"{label}: {', '.join(outside[:3])} is outside the decoder layers, so no "
                                  "calibration activations reach it; add it to `ignore` or use method: rtn")
        uneven = self._uneven_bnb_blocks(targets)
        untied = untie_output_head(model, targets)
        # names from here on, each module looked up when it is quantized: a dict of the modules kept
        # through the pass held every Linear it replaces until the end, beside its compressed replacement
        # (a dense model's worth), and with layers left on disk (max_memory) grew memory by a layer per layer
        names = list(targets)
        del targets
        with timed(report), torch.no_grad():
            if c.method == "gptq":
                ctx.run_sequential(model, lambda step: self._gptq_layer(step, model, names, restore, notes, label),
                                   pass_name=label)
            else:
                def quantize(name: str, module: nn.Module) -> None:
                    new = self._quantize_module(model, module)
                    replace_module(model, name, new)
                    restore[name] = new.restore_spec()

                prefix, _ = decoder_layers(model)
                inside = [n for n in names if n.startswith(prefix + ".")] if c.method == "rtn" else []
                layer_by_layer = set(inside)
                for name in names:  # (bitsandbytes' layers, and modules outside the decoder layers: the head)
                    if name not in layer_by_layer:
                        quantize(name, model.get_submodule(name))
                if inside:  # layer by layer: layers left on disk (compress.load(max_memory=...)) are read in turn
                    for_each_layer(model, lambda i, lname, layer: [
                        quantize(n, m) for n, m in modules_in_layer(inside, lname, layer).items()],
                        ctx.device, progress=ctx.progress, description=label)  # (a GPU model stays there)
            if c.method in BNB_METHODS:
                model.config.quantization_config = self.bnb_config(model, set(names))
        report.bytes_after = sum(tensor_bytes(model.get_submodule(n)) for n in names)
        report.details = {
            "method": c.method,
            **({"bits": c.bits, "group_size": c.group_size, "symmetric": c.symmetric}
               if c.method not in BNB_METHODS else {}),
            "pruned_layers_kept_sparse": sum(1 for s in restore.values() if s.get("sparsity")),
            **({"hessian": notes} if notes else {}),
            **({"untied": True} if untied else {}),
            "restore": restore,
        }
        if untied:
            report.notes.append(UNTIED_NOTE)
        if uneven:
            report.notes.append(uneven)
        return report

    def _uneven_bnb_blocks(self, targets: dict[str, nn.Module]) -> str | None:
        """nf4/fp4: a note where a layer's input width is no multiple of bnb_blocksize. bitsandbytes' CPU path (what
        plain transformers runs on a CPU with AVX512-BF16) reshapes the absmax blocks per row and fails on such a
        layer at its first forward; compress.load and GPUs run it."""
        c = self.config
        if c.method not in ("nf4", "fp4"):
            return None
        widths = {name: m.in_features for name, m in targets.items() if m.in_features % c.bnb_blocksize}
        if not widths:
            return None
        sizes = sorted(get_args(type(c).model_fields["bnb_blocksize"].annotation), reverse=True)
        fits = [b for b in sizes if all(m.in_features % b == 0 for m in targets.values())]
        name, width = next(iter(widths.items()))
        return (f"bnb_blocksize {c.bnb_blocksize} does not divide the input width of {len(widths)} layer(s) ({name}: "
                f"{width}): bitsandbytes' CPU kernels, which plain transformers runs on a CPU, fail on them at the "
                f"first forward (compress.load and GPUs run them)"
                + (f"; bnb_blocksize {fits[0]} divides every width" if fits else ""))

    def _weight_and_mask(self, module: nn.Module):
        """(dense float weight, kept-mask or None, (n, m) or None) of a Linear, a pruned Linear stored dense or a
        pruned SparseLinear. A pruned layer stored dense (prune's `storage: dense`, or `auto` where packing saves
        nothing) has its zeros as the mask: GPTQ filled 6% of them before, silently, and a 2:4 layer lost its
        structure."""
        if isinstance(module, SparseLinear):
            return module.dense_weight(torch.float32), sparse_kept_mask(module), \
                ((module.n, module.m) if module.format == "nm" else None)
        weight = module.weight.detach().float()
        if getattr(module, "compress_pruned", False):
            return weight, *dense_pruned_mask(weight, getattr(module, "compress_pruned_nm", None))
        return weight, None, None

    def _quantize_module(self, model: nn.Module, module: nn.Module, hessian: torch.Tensor | None = None,
                         notes: dict | None = None, name: str = "") -> nn.Module:
        # a new module starts in training mode; LLM.int8's matmul differs between the two
        return self._new_module(model, module, hessian, notes, name).train(module.training)

    def _new_module(self, model, module, hessian, notes, name) -> nn.Module:
        c = self.config
        if c.method in ("nf4", "fp4"):
            return Bnb4bitLinear.from_linear(module, quant_type=c.method, blocksize=c.bnb_blocksize,
                                             double_quant=c.double_quant,
                                             compute_dtype=DTYPES[c.compute_dtype])
        if c.method == "int8":
            return Bnb8bitLinear.from_linear(module, threshold=c.threshold)
        weight, mask, nm = self._weight_and_mask(module)
        group = module.in_features if c.group_size == -1 else min(c.group_size, module.in_features)
        scale_dtype = checkpoint_dtype(model)  # scales exact in the checkpoint: reload computes the same
        if hessian is None:
            codes, scales, zeros = quantize_rtn(weight, c.bits, group, c.symmetric, scale_dtype, mask)
        else:
            result = gptq_quantize(weight, hessian, c.bits, group, c.symmetric, act_order=c.act_order, mask=mask,
                                   blocksize=c.blocksize, dampening=c.dampening, scale_dtype=scale_dtype)
            if result.fallback or result.notes:
                notes[name] = result.fallback or "; ".join(result.notes)
            codes, scales, zeros = result.codes, result.scales, result.zeros
        ref = next(t for t in module.buffers() if t.is_floating_point()) if isinstance(module, SparseLinear) \
            else module.weight
        if mask is not None and nm is None and not isinstance(module, SparseLinear):
            # unstructured and stored dense, as it came: its zeros stay as codes of zero (a bitmask beside the dense
            # codes would add a bit a weight, 25% of 4-bit codes, and save nothing)
            codes, mask = zero_where_pruned(codes, mask, zeros, group), None
        return QuantizedLinear.from_codes(codes, scales, zeros, bits=c.bits, group_size=group,
                                          bias=getattr(module, "bias", None), mask=mask, nm=nm, dtype=ref.dtype)

    def _gptq_layer(self, step, model, names: list[str], restore, notes, label) -> None:
        mods = modules_in_layer(names, step.name, step.layer)
        if not mods:
            return
        accs = input_statistics(step, mods, lambda m: HessianAccumulator(m.in_features, step.inputs[0].device))
        check_calibration_inputs(accs, label, without_data="method: rtn")
        for name, module in mods.items():
            new = self._quantize_module(model, module, accs[name].hessian, notes, name)
            replace_module(model, name, new)
            restore[name] = new.restore_spec()

    def bnb_config(self, model: nn.Module, quantized: set[str]) -> dict:
        """config.json's `quantization_config`, as transformers' BitsAndBytesConfig writes it; Linear layers left
        dense are listed in llm_int8_skip_modules so that transformers leaves them dense too."""
        from transformers import BitsAndBytesConfig

        c = self.config
        skip = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, SparseLinear)) and n not in quantized]
        if c.method == "int8":
            cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=c.threshold, llm_int8_skip_modules=skip)
        else:
            cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=c.method,
                                     bnb_4bit_use_double_quant=c.double_quant,
                                     bnb_4bit_compute_dtype=DTYPES[c.compute_dtype],
                                     llm_int8_skip_modules=skip)
        return cfg.to_dict()

    # ---------------------------------------------------------------------------------------------- checkpoint
    def write_files(self, model: nn.Module, entry: dict[str, Any], state: dict, folder) -> dict:
        """bitsandbytes' scales stay float32 in the checkpoint (as transformers saves them), not the storage dtype."""
        for name, module in model.named_modules():
            if isinstance(module, (Bnb4bitLinear, Bnb8bitLinear)):
                for key, t in module.state_dict().items():
                    if t.is_floating_point() and key != "bias":
                        state[f"{name}.{key}"] = t.detach().to("cpu").contiguous()
        return state

    def restore(self, model: nn.Module, entry: dict[str, Any]) -> None:
        """Swap in empty quantized modules shaped like the checkpoint's tensors, before the state dict loads."""
        c = self.config
        for name, spec in (entry.get("restore") or {}).items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"checkpoint quantizes {name}, which this model does not have") from None
            if not isinstance(module, (nn.Linear, SparseLinear)):
                raise CheckpointError(f"checkpoint quantizes {name}, but it is a {type(module).__name__}")
            ref = next(t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point())
            bias = getattr(module, "bias", None) is not None
            if c.method in ("nf4", "fp4"):
                new = Bnb4bitLinear(module.in_features, module.out_features, quant_type=c.method,
                                    blocksize=c.bnb_blocksize, double_quant=c.double_quant,
                                    compute_dtype=DTYPES[c.compute_dtype],
                                    state_bytes=int(spec["state_bytes"]), bias=bias, dtype=ref.dtype, device=ref.device)
            elif c.method == "int8":
                new = Bnb8bitLinear(module.in_features, module.out_features, threshold=c.threshold, bias=bias,
                                    dtype=ref.dtype, device=ref.device)
            else:
                group = module.in_features if c.group_size == -1 else min(c.group_size, module.in_features)
                recorded = (spec.get("bits"), spec.get("group_size"), spec.get("symmetric"))
                if recorded != (c.bits, group, c.symmetric):  # what inspect prints vs what the layer holds
                    raise CheckpointError(f"the quantize entry (bits {c.bits}, group_size {c.group_size}, symmetric "
                                          f"{c.symmetric}) disagrees with {name}'s record (bits {recorded[0]}, "
                                          f"group_size {recorded[1]}, symmetric {recorded[2]}): the checkpoint was "
                                          "edited or damaged; write it again")
                new = QuantizedLinear.empty(module, spec)
            replace_module(model, name, new)


@torch.no_grad()
def sparse_kept_mask(module: SparseLinear) -> torch.Tensor:
    """bool [out, in], True where a pruned layer keeps its weight (from its indices or bitmask, not from values)."""
    from ..kernels.sparse_bitmask import unpack_bitmask

    if module.format == "bitmask":
        return unpack_bitmask(module.bitmask, module.in_features)
    return nm_kept_mask(module.indices, module.n, module.m, module.in_features)

"""The `prune` pass: glue between recipes and the math in masks.py, wanda.py, sparsegpt.py and owl.py.

Magnitude needs no data. Wanda and SparseGPT run through the sequential runner: per decoder layer, forward hooks
on the targeted Linears collect input norms (Wanda) or Hessians (SparseGPT), the layer is pruned, and its pruned
outputs feed the next layer. Each pruned Linear is then replaced by a `SparseLinear` holding the packed weight,
unless dense storage is smaller (low sparsity) or `storage: dense` is asked for."""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..hessian import check_calibration_inputs
from ..hessian import input_statistics
from ..models import checkpoint_dtype
from ..pass_api import (UNTIED_NOTE, Pass, PassConfig, PassContext, PassReport, left_by_earlier, replace_module,
                        restoring, tensor_bytes, timed, untie_output_head)
from ..registry import register_pass
from ..sequential import modules_in_layer
from ..targets import match_modules
from .masks import magnitude_scores, nm_mask, parse_structure, unstructured_mask
from .owl import outlier_ratio, owl_sparsities
from .packing import bitmask_nbytes, nm_nbytes
from .sparse_linear import SparseLinear
from .sparsegpt import HessianAccumulator, sparsegpt_prune
from .wanda import InputNormAccumulator, wanda_mask, wanda_scores

@register_pass("prune")
class Prune(Pass):
    """Zero out weights of Linear layers by importance (magnitude, Wanda, SparseGPT) and store them packed."""

    supports_offload = True  # decoder layers reached only layer by layer (see Pass.supports_offload)

    class Config(PassConfig):
        method: Literal["magnitude", "wanda", "sparsegpt"] = Field(
            "magnitude", description="importance: |w| (no data), |w| x input norm (Wanda), or OBS with updates "
                                     "(SparseGPT)")
        sparsity: float | list[float] = Field(
            0.5, description="fraction of weights to zero: one number, or one per decoder layer")
        structure: str = Field("unstructured", description='"unstructured" or "N:M" (N kept of every M)')
        storage: Literal["auto", "packed", "dense"] = Field(
            "auto", description="auto keeps whichever of packed (SparseLinear) and dense is smaller")
        owl: bool = Field(False, description="OWL non-uniform layer sparsity (same mean), unstructured only")
        owl_lambda: float = Field(0.08, gt=0.0, lt=0.5, description="OWL: layer sparsities span +-lambda")
        owl_threshold: float = Field(5.0, gt=0.0, description="OWL: outlier = score above this x layer mean")
        blocksize: int = Field(128, ge=1, description="SparseGPT: columns per lazy-update block")
        dampening: float = Field(0.01, gt=0.0, description="SparseGPT: dampening, fraction of mean diag(H)")

        @field_validator("sparsity")
        @classmethod
        def _fraction(cls, value):
            for s in value if isinstance(value, list) else [value]:
                if not 0.0 <= s < 1.0:
                    raise ValueError(f"sparsity is the fraction of weights to zero, in [0, 1); got {s}")
            return value

        @field_validator("structure", mode="before")
        @classmethod
        def _quoted_nm(cls, value):
            if isinstance(value, int):  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124
                raise ValueError(f'got the number {value}: quote N:M in YAML, e.g. structure: "2:4"')
            return value

    def _foreign_options(self) -> set[str]:
        """Options that do nothing with these settings (OWL's without owl, SparseGPT's with another method)."""
        c = self.config
        return ({"owl_lambda", "owl_threshold"} if not c.owl else set()) | \
            ({"blocksize", "dampening"} if c.method != "sparsegpt" else set())

    def entry(self, report=None) -> dict[str, Any]:
        """Also the layers pruned but stored dense (`dense_pruned`): their zeros are the mask (recover keeps them).
        Options that did nothing (at their defaults: validate_config) are left out of the record."""
        out = super().entry(report)
        foreign = self._foreign_options()
        out["args"] = {k: v for k, v in out["args"].items() if k not in foreign}
        if report is not None and report.details.get("dense_pruned"):
            out["dense_pruned"] = report.details["dense_pruned"]
        return out

    def validate_config(self) -> None:
        c = self.config
        set_here = sorted(o for o in self._foreign_options() if o in c.model_fields_set
                          and getattr(c, o) != type(c).model_fields[o].default)
        if set_here:
            raise ConfigError(f"prune: {', '.join(set_here)} does nothing here (OWL's options need owl: true, "
                              "blocksize and dampening method: sparsegpt); drop it")
        nm = parse_structure(c.structure)
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if "sparsity" in c.model_fields_set and (not isinstance(c.sparsity, float) or abs(c.sparsity - implied) > 1e-9):
                raise ConfigError(f"structure {c.structure} fixes sparsity at {implied:g}; drop `sparsity` or set it "
                                  f"to {implied:g}")
            # record the implied sparsity, so the checkpoint's arguments validate again when it is reloaded
            c.sparsity = implied
            if c.owl:
                raise ConfigError("owl (non-uniform layer sparsity) works with unstructured pruning only; "
                                  "drop `owl` or use structure: unstructured")
        if c.owl and isinstance(c.sparsity, list):
            raise ConfigError("owl sets each layer's sparsity from its outliers, around one mean: give one sparsity, "
                              "or drop owl to use the per-layer list")
        if isinstance(c.sparsity, list) and not c.sparsity:
            raise ConfigError("sparsity list is empty: give one number, or one per decoder layer")
        if not restoring() and (c.sparsity == 0 or isinstance(c.sparsity, list) and not any(c.sparsity)):
            raise ConfigError("sparsity 0 prunes nothing (every layer would be stored as it is, or packed larger): "
                              "give the fraction of weights to zero, e.g. 0.5")

    def needs_calibration_for(self) -> bool:
        return self.config.method != "magnitude" or self.config.owl

    def calibration_bytes(self, model: nn.Module, calibration) -> int:
        from ..sequential import calibration_bytes

        return calibration_bytes(model, calibration.num_samples, calibration.seq_len, self._checked_targets(model),
                                 hessians=self.config.method == "sparsegpt") if self.needs_calibration_for() else 0

    # ---------------------------------------------------------------------------------------------- apply
    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        from ..sequential import decoder_layers, for_each_layer

        targets = self._checked_targets(model)
        self._check_sparser_than_before(targets)  # (the earlier passes of a recipe ran since `check`)
        report = PassReport(name=self.name, modules=list(targets), skipped=self._skipped(model))
        report.bytes_before = sum(tensor_bytes(m) for m in targets.values())
        nm = parse_structure(self.config.structure)
        prefix, layers = decoder_layers(model)
        layer_of = {name: _layer_index(name, prefix) for name in targets}
        state = _RunState(model=model, nm=nm, value_bytes=checkpoint_dtype(model).itemsize, layer_of=layer_of)
        label = f"prune ({self.config.method})"
        outside = [n for n, i in layer_of.items() if i is None]
        if outside and self.config.method != "magnitude":  # before anything changes (the head untied below)
            raise ConfigError(f"{label}: {', '.join(outside[:3])} is outside the decoder layers, so no "
                              "calibration activations reach it; add it to `ignore` or use method: magnitude")
        untied = untie_output_head(model, targets)
        # names from here on, each module looked up when its layer is reached: a dict of the modules kept
        # through the pass held every Linear it replaces until the end, beside its compressed replacement
        # (a dense model's worth), and with layers left on disk (max_memory) grew memory by a layer per layer
        names = list(targets)
        del targets
        with timed(report), torch.no_grad():
            layer_sparsity = self._layer_sparsities(len(layers), layer_of, model, ctx, label)
            if self.config.method == "magnitude":
                def magnitude(name: str, module: nn.Linear) -> None:
                    self._check_sparser_than_before({name: module})  # (a layer on disk is seen only now)
                    s = self._sparsity_of(layer_of[name], layer_sparsity)
                    mask = nm_mask(magnitude_scores(module.weight), *nm) if nm else \
                        unstructured_mask(magnitude_scores(module.weight), s)
                    self._finish(state, name, module, module.weight.detach(), mask)

                for name in names:
                    if layer_of[name] is None:
                        magnitude(name, model.get_submodule(name))
                # layer by layer, so that layers left on disk (compress.load(max_memory=...)) are read in turn
                for_each_layer(model, lambda i, lname, layer: [
                    magnitude(name, module) for name, module in modules_in_layer(names, lname, layer).items()],
                    ctx.device, progress=ctx.progress, description=label)  # (each layer visits the pass's device)
            else:
                ctx.run_sequential(model, lambda step: self._prune_layer(step, names, layer_sparsity, state, label),
                                   pass_name=label)
        report.bytes_after = sum(tensor_bytes(model.get_submodule(n)) for n in names)
        report.details = {
            "method": self.config.method,
            "structure": self.config.structure,
            "sparsity": state.zeros / max(state.total, 1),
            # per decoder layer, what was pruned (rows round their kept counts) and what OWL / the list asked for
            "layer_sparsity": ([round(z / t, 4) if t else None for z, t in
                                (state.layer_zeros.get(i, (0, 0)) for i in range(len(layer_sparsity)))]
                               if layer_sparsity else None),
            "layer_sparsity_target": ([None if s is None else round(s, 4) for s in layer_sparsity]
                                      if layer_sparsity else None),
            "storage": {"packed": len(state.restore), "dense": len(names) - len(state.restore)},
            **({"hessian": state.hessian_notes} if state.hessian_notes else {}),
            "restore": state.restore,
            "dense_pruned": state.dense_pruned,
            **({"untied": True} if untied else {}),
        }
        if untied:
            report.notes.append(UNTIED_NOTE)
        if state.kept_zeros:  # `sparsity` is what the mask prunes (the structure); the weights hold more zeros
            report.details["zeros"] = (state.zeros + state.kept_zeros) / max(state.total, 1)
            kept = state.kept_zeros / max(state.total, 1)
            if kept >= 0.0005:  # (not a trained model's own few exact zeros)
                report.notes.append(f"{kept:.1%} of the weights are zeros in places the mask keeps (an earlier "
                                    f"prune's, e.g. N:M groups it left sparser): stored as values, so "
                                    f"{report.details['zeros']:.1%} of the weights are zero; a later recover trains "
                                    "them as kept weights")
        return report

    def _checked_targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        matched = self.target_modules(model)
        nm = parse_structure(self.config.structure)
        for name, module in matched.items():
            if name in self.config.targets and not isinstance(module, nn.Linear):
                raise ConfigError(f"prune targets Linear layers; {name} is a {type(module).__name__}: "
                                  "name its Linear layers or use a pattern like 're:.*mlp\\..*'")
        # a pattern such as re:.*mlp.* also matches the MLP container: keep the Linear layers it holds
        targets = {n: m for n, m in matched.items() if isinstance(m, nn.Linear)}
        if not targets:
            done = self._skipped(model)
            if done:  # the targets match, but an earlier pass replaced those layers
                name, why = next(iter(done.items()))
                raise ConfigError(f"prune: every layer the targets match is {why} by an earlier pass or in the "
                                  f"model loaded (e.g. {name}): prune the original model, before quantize, and each "
                                  "layer once")
            raise ConfigError(f"prune: targets {self.config.targets} match no Linear layer; name Linear layers")
        for name, module in targets.items():
            if nm is not None and module.in_features % nm[1]:
                raise ConfigError(f"{name}: input width {module.in_features} is not divisible by M={nm[1]}; "
                                  "ignore this module or choose another N:M")
        return targets

    def _skipped(self, model: nn.Module) -> dict[str, str]:
        """Matched modules an earlier pass already compressed: pruning them again is not supported (a quantized
        weight has no dense values to score; a packed one is already pruned), so they stay as they are."""
        from ..quantize.bnb import Bnb4bitLinear, Bnb8bitLinear
        from ..quantize.quantized_linear import QuantizedLinear

        matched = self.target_modules(model)
        matched.update(match_modules(model, ["SparseLinear", "QuantizedLinear", "Bnb4bitLinear", "Bnb8bitLinear"],
                                     self.config.ignore, require_all=False)
                       if "Linear" in self.config.targets else {})
        why = {SparseLinear: "already pruned (packed)", QuantizedLinear: "already quantized",
               Bnb4bitLinear: "already quantized", Bnb8bitLinear: "already quantized"}
        return {n: why[type(m)] for n, m in model.named_modules() if n in matched and type(m) in why}

    def describe(self, model: nn.Module) -> list[str]:
        return list(self._checked_targets(model))

    def check(self, model: nn.Module) -> None:
        """Targets and N:M widths (describe), and a per-layer sparsity list of the model's length: found by --dry-run
        and before any pass runs, at the recipe line (it failed only when this pass began)."""
        from ..sequential import decoder_layers

        targets = self._checked_targets(model)
        self._check_sparser_than_before(targets)
        s = self.config.sparsity
        if isinstance(s, list) and parse_structure(self.config.structure) is None:
            prefix, layers = decoder_layers(model)
            self._layer_sparsities(len(layers), {n: _layer_index(n, prefix) for n in targets}, model, None, "")

    def _check_sparser_than_before(self, targets: dict[str, nn.Module]) -> None:
        """A layer an earlier prune left dense-stored may be pruned again (gradually: its zeros score lowest and go
        first), but only to more sparsity than it has: asked for less, the pass changed nothing, reported its own
        figure over a sparser layer and stored zeros as kept values. Checked for one sparsity for all layers."""
        wanted = self.config.sparsity
        # N:M may still change an unstructured layer (groups with too many weights); lists and OWL: not checked
        if parse_structure(self.config.structure) is not None or isinstance(wanted, list) or self.config.owl:
            return
        for name, module in targets.items():
            if getattr(module, "compress_pruned", False) and not module.weight.is_meta:
                w = module.weight
                zeros = 1 - int(torch.count_nonzero(w)) / w.numel()
                if zeros >= wanted - 1 / w.shape[-1]:  # (masks round their count per row)
                    raise ConfigError(f"prune: {name} is already {zeros:.1%} sparse (an earlier prune, stored dense): "
                                      f"pruning it to {wanted:.1%} would change nothing; ask for more sparsity, or "
                                      "leave it out (ignore)")

    def taken_by(self, earlier: Pass, model: nn.Module) -> str | None:
        if earlier.name == "quantize":
            return "already quantized"  # the run's reasons (_skipped)
        return "already pruned (packed)" if earlier.name == "prune" and earlier.stores_packed(model) else None

    def check_after(self, model: nn.Module, earlier) -> None:
        """A layer an earlier quantize pass replaces, or an earlier prune stores packed, cannot be pruned (no dense
        values to score; the run skips it): when that leaves this pass no layer, the run would stop only after those
        passes ran. Said here, before any work (and by --dry-run)."""
        if not left_by_earlier(model, self._checked_targets(model), earlier, lambda p: self.taken_by(p, model)):
            raise ConfigError("prune: every layer the targets match is quantized or pruned (packed) by an earlier "
                              "pass: put prune before quantize, and prune each layer once")

    def stores_packed(self, model: nn.Module) -> bool:
        """Whether this pass leaves its layers as packed SparseLinear modules, judged before it runs: `storage`, or
        for `auto` whether packing a typical target at the configured sparsity is smaller than dense (`_finish`
        decides per layer on the real mask)."""
        if self.config.storage != "auto":
            return self.config.storage == "packed"
        layer = next(iter(self._checked_targets(model).values()))
        rows, cols = layer.weight.shape
        value_bytes = checkpoint_dtype(model).itemsize  # what `_finish` sizes by, whatever the compute dtype
        nm = parse_structure(self.config.structure)
        s = self.config.sparsity
        # the least sparse layer decides (a per-layer list, OWL's spread): a layer left dense stays prunable
        least = min(s) if isinstance(s, list) else s - (self.config.owl_lambda if self.config.owl else 0.0)
        packed = nm_nbytes(rows, cols, *nm, value_bytes) if nm else \
            bitmask_nbytes(rows, cols, round((1 - max(least, 0.0)) * rows * cols), value_bytes)
        return packed < rows * cols * value_bytes

    def _layer_sparsities(self, num_layers, layer_of, model, ctx, label) -> list[float] | None:
        """One sparsity per decoder layer (None when a single number applies everywhere and OWL is off)."""
        s = self.config.sparsity
        nm = parse_structure(self.config.structure)
        if nm is not None:
            return None
        if isinstance(s, list):
            if len(s) != num_layers:
                raise ConfigError(f"sparsity lists {len(s)} values but the model has {num_layers} decoder layers; "
                                  "give one per layer or a single number")
            outside = [n for n, i in layer_of.items() if i is None]
            if outside:
                raise ConfigError(f"per-layer sparsity applies to decoder layers, but {outside[0]} is outside them; "
                                  "add it to `ignore` or give one sparsity")
            return list(s)
        if not self.config.owl:
            return None
        names = list(layer_of)  # the Linear targets (a pattern may also match their containers)
        ratios: dict[int, float] = {}

        def measure(step):
            mods = modules_in_layer(names, step.name, step.layer)
            if not mods:
                return
            accs = input_statistics(step, mods, lambda m: InputNormAccumulator(m.in_features, m.weight.device))
            check_calibration_inputs(accs, label, without_data="owl: false" if self.config.method == "magnitude"
                                     else "method: magnitude")
            ratios[step.index] = outlier_ratio([wanda_scores(m.weight, accs[n].norms()) for n, m in mods.items()],
                                               self.config.owl_threshold)

        ctx.run_sequential(model, measure, pass_name=f"{label}: OWL outlier ratios")
        # spread over the layers that have targets only: a layer with none (e.g. ignored) took a share of the mean
        # it never pruned and set the low end of the min-max scaling (0.475 pruned for 0.5 asked, layer 0 ignored)
        if not ratios:  # no target inside a decoder layer (e.g. only lm_head): nothing to spread
            return None
        pruned = sorted(ratios)
        spread = owl_sparsities([ratios[i] for i in pruned], s, self.config.owl_lambda)
        by_layer = dict(zip(pruned, spread))
        return [by_layer.get(i) for i in range(num_layers)]

    def _sparsity_of(self, layer: int | None, layer_sparsity: list[float] | None) -> float:
        if layer_sparsity is None or layer is None:
            s = self.config.sparsity
            return float(s) if not isinstance(s, list) else float(sum(s) / len(s))
        return layer_sparsity[layer]

    def _prune_layer(self, step, names: list[str], layer_sparsity, state: "_RunState", label: str) -> None:
        mods = modules_in_layer(names, step.name, step.layer)
        if not mods:
            return
        self._check_sparser_than_before(mods)  # (a layer on disk is seen only now; one in memory was before work)
        sparse_gpt = self.config.method == "sparsegpt"
        acc_type = HessianAccumulator if sparse_gpt else InputNormAccumulator
        accs = input_statistics(step, mods, lambda m: acc_type(m.in_features, m.weight.device))
        check_calibration_inputs(accs, label, without_data="method: magnitude")
        s = self._sparsity_of(step.index, layer_sparsity)
        for name, module in mods.items():
            if sparse_gpt:
                result = sparsegpt_prune(module.weight, accs[name].hessian, s, state.nm,
                                         blocksize=self.config.blocksize, dampening=self.config.dampening)
                if result.fallback or result.notes:
                    state.hessian_notes[name] = result.fallback or "; ".join(result.notes)
                weight, mask = result.weight, result.mask
            else:
                weight = module.weight.detach()
                mask = wanda_mask(weight, accs[name].norms(), s, state.nm)
            self._finish(state, name, module, weight, mask)

    def _finish(self, state: "_RunState", name: str, module: nn.Linear, weight: torch.Tensor, mask: torch.Tensor) -> None:
        """Write the pruned weight, and swap in a packed SparseLinear when that is smaller (or asked for)."""
        # a new tensor, not copy_ into the old one: a loaded weight is a view of the checkpoint's file mapping, and
        # writing into it copies each page it touches into anonymous memory that lives as long as the mapping does
        # (every layer's, for the whole run: 722 -> 489 MB anonymous after packing an 8-layer 0.12B bf16 model,
        # the memory it left behind)
        pruned_weight = weight.detach().to(module.weight.dtype) * mask.to(module.weight.dtype)
        pruned = int((~mask).sum())
        state.zeros += pruned
        # zeros in kept places (an N:M mask over a layer an earlier prune left sparser keeps some of its zeros)
        state.kept_zeros += mask.numel() - pruned - int(torch.count_nonzero(pruned_weight))
        state.total += mask.numel()
        counts = state.layer_zeros.setdefault(state.layer_of.get(name), [0, 0])
        counts[0], counts[1] = counts[0] + pruned, counts[1] + mask.numel()
        rows, cols = module.weight.shape
        dense = rows * cols * state.value_bytes
        packed = nm_nbytes(rows, cols, *state.nm, state.value_bytes) if state.nm else \
            bitmask_nbytes(rows, cols, int(mask.sum()), state.value_bytes)
        if self.config.storage == "packed" or (self.config.storage == "auto" and packed < dense):
            sparse = SparseLinear.from_weight(pruned_weight, mask, state.nm, module.bias)
            replace_module(state.model, name, sparse)
            state.restore[name] = sparse.restore_spec()
        else:  # its exact zeros are the mask: marked, so that recover keeps them however few they are
            module.weight.data = pruned_weight
            module.compress_pruned = True
            module.compress_pruned_nm = state.nm  # (a later quantize keeps the structure: dense_pruned_mask)
            state.dense_pruned.append(name)

    # ---------------------------------------------------------------------------------------------- restore
    def restore(self, model: nn.Module, entry: dict[str, Any]) -> None:
        """Swap in SparseLinear modules shaped like the checkpoint's packed tensors, before the state dict loads; mark
        the layers pruned but stored dense."""
        dense_pruned = entry.get("dense_pruned") or []
        if not isinstance(dense_pruned, list) or not all(isinstance(n, str) for n in dense_pruned):
            raise CheckpointError("the prune entry's `dense_pruned` is not a list of module names: the checkpoint's "
                                  "config.json is damaged")
        modules = dict(model.named_modules())
        try:
            nm = parse_structure(str((entry.get("args") or {}).get("structure", "unstructured")))
        except ConfigError:  # (a damaged record: the zeros are still the mask, without a structure)
            nm = None
        for name in dense_pruned:
            module = modules.get(name)
            if isinstance(module, nn.Linear):
                module.compress_pruned, module.compress_pruned_nm = True, nm
        for name, spec in (entry.get("restore") or {}).items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"checkpoint prunes {name}, which this model does not have") from None
            if not isinstance(module, nn.Linear):
                raise CheckpointError(f"checkpoint packs {name} as sparse, but it is a {type(module).__name__}")
            replace_module(model, name, SparseLinear.empty(module, spec))


class _RunState:
    def __init__(self, model: nn.Module, nm, value_bytes: int, layer_of: dict[str, int | None]):
        self.model, self.nm, self.value_bytes, self.layer_of = model, nm, value_bytes, layer_of
        self.zeros = self.total = self.kept_zeros = 0
        self.layer_zeros: dict[int | None, list[int]] = {}  # decoder layer -> [pruned, total] weights
        self.restore: dict[str, dict] = {}
        self.dense_pruned: list[str] = []
        self.hessian_notes: dict[str, str] = {}




def _layer_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    return int(name[len(prefix) + 1:].split(".", 1)[0])





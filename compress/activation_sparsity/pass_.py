"""The `activation_sparsity` pass: glue between recipes and calibrate.py / mlp.py.

Every targeted gated MLP (Llama, Mistral, Qwen2/3 layout: gate_proj, up_proj, down_proj, act_fn) becomes an
`ActivationSparseMLP`; per-layer gate thresholds are calibrated on the calibration windows to the perplexity
budget. The checkpoint records, per MLP, its exact threshold (in the compression section; the tensors are the
dense model's)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..models import checkpoint_dtype
from ..pass_api import Pass, PassConfig, PassContext, PassReport, replace_module, tensor_bytes, timed
from ..registry import register_pass
from .calibrate import calibrate_thresholds
from .mlp import ActivationSparseMLP

_GATED = ("gate_proj", "up_proj", "down_proj", "act_fn")


@register_pass("activation_sparsity")
class ActivationSparsity(Pass):
    """Skip FFN neurons whose gate activation is below a per-layer threshold fitted to a perplexity budget (CATS)."""

    class Config(PassConfig):
        targets: list[str] = Field(default_factory=lambda: [r"re:.*\.mlp"],
                                   description="the gated MLP modules (containers of gate_proj/up_proj/down_proj)")
        ignore: list[str] = Field(default_factory=list)
        target_ppl_increase: float = Field(0.01, gt=0.0, lt=1.0,
                                           description="perplexity budget on the calibration windows (0.01 = +1%)")
        max_sparse_tokens: int = Field(4, ge=1, le=256,
                                       description="calls with at most this many tokens read only active neurons")
        search_tokens: int = Field(2048, ge=64, description="calibration tokens whose activations set the thresholds")
        outer_steps: int = Field(10, ge=1, le=30, description="bisection steps over the CETT value")
        inner_steps: int = Field(20, ge=1, le=60, description="bisection steps per layer threshold")
        greedy_rounds: int = Field(0, ge=0, le=200, description="0: one CETT value for all layers (bisection); > 0: "
                                   "per-layer thresholds built up greedily in this many rounds (each evaluates every "
                                   "layer once; more sparsity on the calibration windows, slower, but it overfits "
                                   "them: check held-out perplexity)")
        greedy_step: float = Field(0.05, gt=0.0, lt=0.5, description="inactive share added to a layer per greedy move")
        predictor_rank: int = Field(0, ge=0, description="0: decoding computes the whole gate; r > 0: a rank-r SVD "
                                    "predictor of the gate picks candidate neurons and only their gate rows are read "
                                    "(saves up to a third of the MLP's weight reads; stored with the weights)")
        predictor_bits: Literal[0, 4, 8] = Field(0, description="0: no quantized predictor; 8 or 4: gate_proj's "
                                                 "int8 / int4 copy (one scale per 128 columns) picks the candidate "
                                                 "neurons, only their gate rows are read in full; a far closer "
                                                 "prediction than a low-rank one, for 25% / 12.5% of the gate's "
                                                 "fp32 bytes more memory (stored with the weights)")
        exact_gate: bool = Field(True, description="False (needs predictor_bits): the gate's quantized copy is the "
                                 "gate itself, on every path: decoding reads no fp32 gate rows (a quarter / an eighth "
                                 "of the gate's bytes instead of the candidates' rows); its rounding error counts in "
                                 "the budget, which is measured against the original model")
        neuron_scaling: bool = Field(True, description="threshold |act(gate)| x s_i, s_i = E|up_i| x ||W_down[:, i]|| "
                                     "on the calibration tokens (channel-wise, CHESS-style) instead of |act(gate)| "
                                     "(CATS): 5-9 points more inactive neurons at the same held-out perplexity on the "
                                     "reference models; the scales are saved with the weights")
        predictor_recall: float = Field(0.99, gt=0.5, le=1.0, description="share of the exactly-active neurons the "
                                        "predictor must keep on the calibration tokens (sets its threshold; lowered "
                                        "further if its misses would take perplexity past the budget)")

        @model_validator(mode="after")
        def _one_predictor(self):
            if self.predictor_rank and self.predictor_bits:
                raise ValueError("choose one gate predictor: predictor_rank (low rank) or predictor_bits (quantized)")
            if not self.exact_gate and not self.predictor_bits:
                raise ValueError("exact_gate: false computes the gate from its quantized copy: set predictor_bits "
                                 "(8 or 4)")
            return self

    needs_calibration = True

    def _mlps(self, model: nn.Module) -> dict[str, nn.Module]:
        matched = self.target_modules(model)
        mlps = {n: m for n, m in matched.items()
                if isinstance(m, ActivationSparseMLP) or all(hasattr(m, a) for a in _GATED)}
        if not mlps:
            raise ConfigError(f"activation_sparsity: targets {self.config.targets} match no gated MLP (a module "
                              "with gate_proj, up_proj, down_proj and act_fn); target e.g. 're:.*\\.mlp'")
        for name, mlp in mlps.items():
            compressed = [a for a in _GATED[:3] if not isinstance(getattr(mlp, a), nn.Linear)]
            if compressed and not isinstance(mlp, ActivationSparseMLP):
                raise ConfigError(f"activation_sparsity needs the MLPs' dense weights, but {name}.{compressed[0]} is "
                                  f"a {type(getattr(mlp, compressed[0])).__name__}: put activation_sparsity before "
                                  "prune and quantize (they compose in that order)")
        return mlps

    def describe(self, model: nn.Module) -> list[str]:
        return list(self._mlps(model))

    def check_later(self, model: nn.Module, later: Pass) -> None:
        """With the quantized copy as the gate, gate_proj is never called again: a later pass that would quantize,
        prune or train it would change nothing the model computes."""
        if self.config.exact_gate:
            return
        if later.name == self.name and set(later.describe(model)) & set(self._mlps(model)):
            raise ConfigError("activation_sparsity twice over the same MLPs, the first with exact_gate: false: the "
                              "second would calibrate on the first's quantized gate; keep one activation_sparsity "
                              "pass")
        why = (f"activation_sparsity before it computes that gate from its int{self.config.predictor_bits} copy "
               "(exact_gate: false), so gate_proj is never called")
        later.check_not_unused(model, {f"{name}.gate_proj": why for name in self._mlps(model)})

    def note_on_later(self, model: nn.Module, later: Pass, later_report: PassReport) -> str | None:
        """Its perplexity budget is met on the MLPs as they were; a later prune, quantize or recover changes them."""
        mlps = list(self._mlps(model))
        if later is self or not any(m.startswith(name + ".") or m == name for m in later_report.modules
                                    for name in mlps):
            return None
        budget = 100 * self.config.target_ppl_increase
        return (f"its perplexity budget (+{budget:g}%) was met before {later.name} changed these MLPs; the "
                "evaluation after the recipe shows the combined cost")

    def check(self, model: nn.Module) -> None:
        super().check(model)
        adopted = next((n for n, m in self._mlps(model).items() if isinstance(m, ActivationSparseMLP)
                        and m.gate_adopted), None)
        if adopted is not None:
            raise ConfigError(f"activation_sparsity: {adopted} already computes its gate from a quantized copy "
                              "(exact_gate: false) and its original gate weights are gone: apply the pass to the "
                              "original model")
        rank = self.config.predictor_rank
        for name, mlp in self._mlps(model).items():  # a rank past the gate's shape failed after the whole search
            limit = min(mlp.gate_proj.weight.shape) if isinstance(mlp.gate_proj, nn.Linear) else None
            if rank and limit is not None and rank > limit:
                raise ConfigError(f"activation_sparsity: predictor_rank {rank} is larger than {name}.gate_proj's "
                                  f"smaller side ({limit}); a rank-r predictor needs r <= {limit} (and reads less "
                                  "than the gate itself only well below it)")

    def check_after(self, model: nn.Module, earlier) -> None:
        """A prune or quantize pass, or an unmerged LoRA adapter, before this one that touches these MLPs'
        projections leaves them no plain Linear layers."""
        mlps = list(self._mlps(model))
        for p in earlier:
            if p.name not in ("prune", "quantize") and not (p.name == "recover" and not p.config.merge):
                continue
            if p.name == "prune" and p.config.storage == "dense":  # plain Linears holding zeros: dense weights
                continue
            hit = next((m for m in p.describe(model) if any(m.startswith(name + ".") for name in mlps)), None)
            if hit is not None:
                raise ConfigError(f"activation_sparsity needs the MLPs' dense weights, but the {p.name} pass before it "
                                  f"replaces {hit}: put activation_sparsity first (prune, quantize and recover "
                                  "compose after it; with exact_gate: false, ignoring gate_proj)"
                                  + ("; or give prune `storage: dense`" if p.name == "prune" else ""))

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        targets = self._mlps(model)
        report = PassReport(name=self.name, modules=list(targets))
        windows = ctx.calibration_batches(self.name)
        c = self.config
        report.bytes_before = sum(tensor_bytes(m) for m in targets.values())
        with timed(report):
            modules = []
            for name, mlp in targets.items():
                # an MLP made activation-sparse before is built again around the same projections, with this config
                # (one whose gate is already a quantized copy is refused by check(), before any pass runs)
                module = ActivationSparseMLP(mlp, max_sparse_tokens=c.max_sparse_tokens,
                                             predictor_rank=c.predictor_rank, predictor_bits=c.predictor_bits,
                                             neuron_scaling=c.neuron_scaling, exact_gate=c.exact_gate)
                module.train(mlp.training)  # eval (the decode path) when the MLP was
                replace_module(model, name, module)
                modules.append(module)
            found = calibrate_thresholds(model, modules, windows, c.target_ppl_increase, search_tokens=c.search_tokens,
                                         outer_steps=c.outer_steps, inner_steps=c.inner_steps,
                                         greedy_rounds=c.greedy_rounds, greedy_step=c.greedy_step,
                                         predictor_recall=c.predictor_recall,
                                         storage_dtype=checkpoint_dtype(model), progress=ctx.progress)
        # the weights are unchanged (this pass saves work); what it adds is the predictor and the neuron scales
        report.bytes_after = sum(tensor_bytes(m) for m in modules)
        restore = {name: {"threshold": float(m.threshold), "predictor_rank": m.predictor_rank,
                          "predictor_bits": m.predictor_bits,
                          "predictor_threshold": float(m.predictor_threshold), "neuron_scaling": m.neuron_scaling,
                          "exact_gate": m.exact_gate}
                   for name, m in zip(targets, modules)}
        report.details = {**found, "restore": restore}
        available = windows.numel()
        if c.search_tokens > available:  # the search took what there was: said, not silent
            report.notes.append(f"activation_sparsity: search_tokens {c.search_tokens} is more than the calibration's "
                                f"{available} tokens; the thresholds were set on {available} (raise the calibration's "
                                f"num_samples or seq_len for more)")
        if not any(m.threshold > 0 for m in modules):  # every CETT tried cost more than the budget
            report.notes.append(f"activation_sparsity found no threshold within its budget "
                                f"(target_ppl_increase {c.target_ppl_increase}): nothing is skipped; raise outer_steps "
                                f"/ inner_steps (the search's resolution) or the budget")
        return report

    def entry_as_held(self, model: nn.Module, entry: dict[str, Any]) -> dict[str, Any]:
        """The thresholds the modules hold now (a user who set one in memory and saved got the pass's value back
        on reload, with logits 1.2 apart and nothing said)."""
        restore, decode_tokens = {}, set()
        for name, spec in (entry.get("restore") or {}).items():
            module = model.get_submodule(name)
            if isinstance(module, ActivationSparseMLP):
                spec = {**spec, "threshold": float(module.threshold),
                        "predictor_threshold": float(module.predictor_threshold)}
                decode_tokens.add(module.max_sparse_tokens)
            restore[name] = spec
        args = entry.get("args") or {}
        held = decode_tokens.pop() if len(decode_tokens) == 1 else None  # (one value for every MLP, as the pass
        if held is not None and 1 <= held <= 256:                             # sets it, within its argument's range)
            args = {**args, "max_sparse_tokens": held}
        return {**entry, "args": args, "restore": restore}

    def restore(self, model: nn.Module, entry: dict[str, Any]) -> None:
        for name, spec in (entry.get("restore") or {}).items():
            try:
                mlp = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"checkpoint makes {name} activation-sparse, but this model has no such module") \
                    from None
            if not all(hasattr(mlp, a) for a in _GATED):
                raise CheckpointError(f"checkpoint makes {name} activation-sparse, but it is not a gated MLP")
            module = ActivationSparseMLP(
                mlp, threshold=float(spec["threshold"]), max_sparse_tokens=self.config.max_sparse_tokens,
                predictor_rank=int(spec.get("predictor_rank", 0)), predictor_bits=int(spec.get("predictor_bits", 0)),
                predictor_threshold=float(spec.get("predictor_threshold", 0.0)),
                neuron_scaling=bool(spec.get("neuron_scaling", False)),
                exact_gate=bool(spec.get("exact_gate", True))).train(mlp.training)
            if not module.exact_gate:  # the adopted copy: its codes stored, gate_proj's weight rebuilt on load
                module.adopt_quantized_gate(expand=False)
            replace_module(model, name, module)

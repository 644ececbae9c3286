"""The `vq_logits` pass: glue between recipes and the math in kmeans.py, fit.py and distill.py.

Finds the output head, gathers calibration hidden states (calibration.py: the head's input) and token counts,
clusters the head's rows into a codebook, fits per-token scale/bias, optionally distills, and swaps in a
`VQLogitsHead`. Tied input/output embeddings are untied: the input embedding is kept as it is."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import CalibrationError, CheckpointError, CompressError, ConfigError, UnsupportedModelError
from ..pass_api import (Pass, PassConfig, PassContext, PassReport, head_shares_embedding, replace_module,
                        tensor_bytes, timed)
from ..registry import register_pass
from .calibration import head_inputs
from .distill import distill_head, kl_dense_to_head
from .fit import fit_scale_bias
from .head import VQLogitsHead, smallest_int_dtype
from .kmeans import cluster_means, spherical_kmeans


def build_vq_head(weight: torch.Tensor, hidden: torch.Tensor | None, counts: torch.Tensor, c: "VQLogits.Config", *,
                  progress: bool = True, keep_stages: bool = False) -> tuple[list[tuple[str, VQLogitsHead]], dict]:
    """Fit a VQ head to the dense head `weight` [V, d] from calibration `hidden` [N, d] and token `counts` [V].

    Returns ([(stage, head)], details): stages "copy", then "scale_bias", then "distill" as configured; the pass
    keeps the one closest to the dense head on the calibration positions (`kept_stage`), normally the last. With
    `keep_stages`, each stage is a separate copy (the pass and the benchmark compare them)."""
    import copy

    vocab = weight.shape[0]
    details: dict = {}
    row_weights = counts + 1 if c.weighting == "frequency" else torch.ones(vocab)
    # shortlist: most frequent calibration tokens (ties to the lower id), kept as exact rows
    order = torch.argsort(-counts, stable=True)
    shortlist_ids = order[: c.shortlist].sort().values
    rest = torch.ones(vocab, dtype=torch.bool)
    rest[shortlist_ids] = False
    rest_ids = rest.nonzero().flatten()
    if rest_ids.numel() < c.num_codes:
        raise ConfigError(f"vq_logits: only {rest_ids.numel()} tokens left outside the shortlist for "
                          f"{c.num_codes} codes; lower num_codes or shortlist")
    w_cpu = weight.detach().float().cpu()
    km = spherical_kmeans(w_cpu[rest_ids], c.num_codes, row_weights[rest_ids], iterations=c.kmeans_iterations,
                          seed=c.seed, progress=progress)
    codes = torch.zeros(vocab, dtype=torch.long)
    codes[rest_ids] = km.assignments
    codebook = cluster_means(w_cpu[rest_ids], km.assignments, c.num_codes, row_weights[rest_ids])
    vq = VQLogitsHead.from_parts(codebook, codes, shortlist_ids=shortlist_ids if c.shortlist else None,
                                 shortlist_weight=w_cpu[shortlist_ids] if c.shortlist else None)
    vq = vq.to(device=weight.device, dtype=weight.dtype)
    details["kmeans_iterations"] = km.iterations
    stages = [("copy", _check_finite("copy", vq))]
    probe = hidden[:4096] if hidden is not None else None
    if probe is not None:
        details["calibration_kl_copy"] = round(kl_dense_to_head(probe, weight, vq), 5)
    if c.scale_bias:
        vq = copy.deepcopy(vq) if keep_stages else vq
        table = torch.cat([vq.codebook.detach(), vq.shortlist_weight.detach()])
        scales, biases = fit_scale_bias(hidden, weight, table, vq.codes, weighting=c.fit_weighting,
                                        share=c.fit_probability_share, progress=progress)
        with torch.no_grad():
            vq.scales.copy_(scales)
            vq.biases.copy_(biases)
        vq.reset_shortlist()
        stages.append(("scale_bias", _check_finite("scale_bias", vq)))
        details["calibration_kl_scale_bias"] = round(kl_dense_to_head(probe, weight, vq), 5)
    if c.distill:
        vq = copy.deepcopy(vq) if keep_stages else vq
        details["distill"] = distill_head(vq, hidden, weight, steps=c.distill_steps, max_seconds=c.distill_seconds,
                                          lr=c.distill_lr, batch_size=c.distill_batch_size, seed=c.seed,
                                          progress=progress)
        stages.append(("distill", _check_finite("distill", vq)))
        details["calibration_kl_distill"] = round(kl_dense_to_head(probe, weight, vq), 5)
    for _, head in stages:
        for p in head.parameters():
            p.requires_grad_(p is not head.shortlist_weight)
    return stages, details


def kept_stage(stages: list[tuple[str, VQLogitsHead]], details: dict) -> tuple[str, VQLogitsHead]:
    """The stage whose head is closest to the dense head on the calibration positions (the last of equals): a fit
    or a distillation that fits even the text it was fitted on worse than the stage before it (a sharply peaked
    head, a few hundred positions) is not kept over it."""
    kls = [details.get(f"calibration_kl_{stage}") for stage, _ in stages]
    if any(kl is None for kl in kls):  # (no calibration: the copy alone)
        return stages[-1]
    best = min(range(len(stages)), key=lambda i: (kls[i], -i))
    return stages[best]


def _check_finite(stage: str, head: VQLogitsHead) -> VQLogitsHead:
    """`head`, as the stage left it; a head with NaN or inf values was written, the apply exiting 0 and every logit
    of the model NaN."""
    bad = [name for name, p in head.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise CompressError(f"vq_logits: the {stage} stage left non-finite values in {', '.join(bad)} (nothing "
                            "written); try scale_bias: false or distill: false, and report it")
    return head


@register_pass("vq_logits")
class VQLogits(Pass):
    """Output head -> K x d codebook + token->code map + per-token scale/bias (+ exact shortlist rows)."""

    once_per_model = True  # one output head: a second vq_logits would replace the first

    supports_offload = True  # touches the head only, which stays resident (see Pass.supports_offload)

    class Config(PassConfig):
        targets: list[str] = Field(default_factory=lambda: ["lm_head"], description="the output head module")
        ignore: list[str] = Field(default_factory=list, description="modules left out of the match")
        num_codes: int = Field(1024, ge=2, description="K, codebook size (2 <= K < vocabulary size)")
        shortlist: int = Field(0, ge=0, description="most frequent calibration tokens kept as exact dense rows")
        scale_bias: bool = Field(True, description="per-token scale and bias; false = the paper's plain copy")
        fit_weighting: Literal["probability", "uniform"] = Field("probability",
                                   description="least-squares weights per token: probability-weighted mix, or uniform")
        fit_probability_share: float = Field(0.2, ge=0, le=1, description="share of each token's fit weight "
                                             "placed by dense probability (the rest is uniform over positions)")
        weighting: Literal["frequency", "uniform"] = Field("frequency",
                               description="k-means row weights: calibration token counts + 1, or uniform")
        kmeans_iterations: int = Field(25, ge=1, le=1000, description="spherical k-means iterations")
        distill: bool = Field(False, description="fine-tune codebook/scales/biases on KL to the dense head")
        distill_steps: int = Field(300, ge=1, description="distillation optimizer steps")
        distill_seconds: float = Field(120.0, gt=0, description="wall-clock budget of distillation")
        distill_lr: float = Field(3e-3, gt=0, description="distillation learning rate (Adam)")
        distill_batch_size: int = Field(256, ge=1, description="calibration positions per distillation step")
        max_fit_tokens: int = Field(65536, ge=16, description="calibration positions kept for fitting")
        seed: int = Field(0, ge=-(2**63), le=2**64 - 1,  # the range torch generators take (checkpoints keep theirs)
                          description="seed of k-means initialization, sampling and distillation")

    def validate_config(self) -> None:
        c = self.config
        if c.distill and not c.scale_bias:
            raise ConfigError("distill: true needs scale_bias: true (distillation trains the scales and biases)")

    def needs_calibration_for(self) -> bool:
        c = self.config
        return c.scale_bias or c.distill or c.shortlist > 0 or c.weighting == "frequency"

    # ------------------------------------------------------------------------------------------------ locating
    def _head(self, model: nn.Module) -> tuple[str, nn.Module]:
        found = self.target_modules(model)
        if len(found) != 1:
            raise ConfigError(f"vq_logits: targets {self.config.targets} must match exactly one output head module, "
                              f"matched {len(found)}: {', '.join(list(found)[:3]) or 'none'}"
                              + (f" and {len(found) - 3} more" if len(found) > 3 else ""))
        name, module = next(iter(found.items()))
        output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output_head is not None and module is not output_head:
            head_name = next((n for n, m in model.named_modules() if m is output_head), "the output head")
            raise ConfigError(f"vq_logits: targets {self.config.targets} match {name}, which is not the model's "
                              f"output head ({head_name}); vq_logits compresses the head that computes the logits")
        return name, module

    # ------------------------------------------------------------------------------------------------ calibration
    @torch.no_grad()
    def _calibration(self, model: nn.Module, head: nn.Module, ctx: PassContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states [N, d] entering the head, token counts [V]) from the calibration batches."""
        if ctx.calibration is None:
            raise CalibrationError(
                "vq_logits with scale_bias, distill, shortlist or weighting: frequency needs calibration data: add "
                "`calibration: {source: builtin:calibration}` to the recipe (or set all of them off for a plain copy)")
        batches = ctx.calibration_batches(self.name)
        vocab = head.weight.shape[0]
        counts = torch.bincount(batches.flatten().clamp(0, vocab - 1), minlength=vocab).float()
        hidden = head_inputs(model, head, batches, keep=self.config.max_fit_tokens, seed=self.config.seed,
                             progress=ctx.progress)
        return hidden, counts

    # ------------------------------------------------------------------------------------------------ apply
    def check(self, model: nn.Module) -> None:
        self._checked_head(model)

    def check_after(self, model: nn.Module, earlier) -> None:
        """An earlier quantize (or prune storing packed) replaces the head this pass needs dense: said before any
        work (the run stopped here after the earlier passes' work, and --dry-run listed both)."""
        name = self._head(model)[0]
        for p in earlier:
            if name in p.describe(model) and (p.name == "quantize" or p.name == "prune" and p.stores_packed(model)):
                raise ConfigError(f"vq_logits needs the dense output head, and the earlier {p.name} pass replaces "
                                  f"{name}: put vq_logits before it, or leave the head out of it (ignore: "
                                  "['re:.*lm_head'])")

    def check_later(self, model: nn.Module, later) -> None:
        """A later pass targeting the head finds the codebook head this pass leaves (prune refused it after the
        k-means work; quantize left it out without a word)."""
        name = self._head(model)[0]
        if later.name != self.name and name in later.describe(model):
            ignore = [*getattr(later.config, "ignore", []), "re:.*lm_head"]
            raise ConfigError(f"{later.name} targets {name}, which the earlier vq_logits pass replaces by its "
                              f"codebook head: set {later.name}'s ignore to {ignore}")

    def _checked_head(self, model: nn.Module) -> tuple[str, nn.Linear]:
        c = self.config
        name, head = self._head(model)
        if isinstance(head, VQLogitsHead):
            raise UnsupportedModelError(f"vq_logits: {name} is a codebook head already (vq_logits ran on this model): "
                                        "run vq_logits on the model it was made from for another codebook")
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise UnsupportedModelError(f"vq_logits: {name} is a {type(head).__name__}"
                                        f"{' with a bias' if isinstance(head, nn.Linear) else ''}; "
                                        "it needs a bias-free nn.Linear output head")
        vocab = head.weight.shape[0]
        if c.num_codes >= vocab:
            raise ConfigError(f"vq_logits: num_codes={c.num_codes} must be smaller than the vocabulary size {vocab}")
        if c.num_codes + c.shortlist > vocab:
            raise ConfigError(f"vq_logits: num_codes + shortlist = {c.num_codes + c.shortlist} exceeds the vocabulary "
                              f"size {vocab}; lower one of them")
        return name, head

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        c = self.config
        name, head = self._checked_head(model)
        vocab, hidden_size = head.weight.shape
        report = PassReport(name=self.name, modules=[name])
        report.bytes_before = tensor_bytes(head)
        weight = head.weight.detach()
        tied = self._is_tied(model, head)
        with timed(report):
            hidden, counts = (self._calibration(model, head, ctx) if self.needs_calibration_for()
                              else (None, torch.zeros(vocab)))
            stages, details = build_vq_head(weight, hidden, counts, c, progress=ctx.progress, keep_stages=True)
            stage, vq = kept_stage(stages, details)
            if stage != stages[-1][0]:
                details["kept_stage"] = stage
            replace_module(model, name, vq)
            if tied:
                model.config.tie_word_embeddings = False
        report.bytes_after = tensor_bytes(vq)
        details.update({
            "vocab_size": vocab, "hidden_size": hidden_size, "num_codes": c.num_codes, "shortlist": c.shortlist,
            "head_params_before": weight.numel(), "head_float_params_after": vq.num_float_parameters(),
            "head_params_ratio": round(weight.numel() / vq.num_float_parameters(), 3),
            "codes_dtype": str(vq.codes.dtype).removeprefix("torch."),
            "untied": tied,
        })
        if tied:
            details["note"] = ("the output head was tied to the input embedding: it is untied, the input embedding is "
                               "kept unchanged, so the model grows by the VQ head's bytes instead of shrinking")
            report.notes.append(details["note"])  # (printed by apply; in details alone, only report.json had it)
        distilled = details.get("distill") or {}
        if distilled and distilled["steps"] < c.distill_steps:  # (its bar counted to distill_steps: said)
            report.notes.append(f"distillation stopped at its time budget (distill_seconds {c.distill_seconds:g}) "
                                f"after {distilled['steps']} of {c.distill_steps} steps, its learning rate not yet "
                                "decayed: raise distill_seconds or lower distill_steps")
        details["restore"] = {"module": name, "vocab_size": vocab, "hidden_size": hidden_size,
                              "num_codes": c.num_codes, "shortlist": c.shortlist, "untied": tied}
        report.details = details
        return report

    @staticmethod
    def _is_tied(model: nn.Module, head: nn.Module) -> bool:
        return head_shares_embedding(model) or bool(getattr(model.config, "tie_word_embeddings", False))

    # ------------------------------------------------------------------------------------------------ restore
    def restore(self, model: nn.Module, entry: dict) -> None:
        r = entry.get("restore")
        if not r:
            raise CheckpointError("vq_logits checkpoint entry has no `restore` record; re-export the model")
        try:
            old = model.get_submodule(r["module"])
        except AttributeError:
            raise CheckpointError(f"checkpoint replaces {r['module']}, which this model does not have") from None
        ref = next(old.parameters())
        head = VQLogitsHead(r["vocab_size"], r["hidden_size"], r["num_codes"], r["shortlist"],
                            dtype=ref.dtype if ref.dtype.is_floating_point else None, device=ref.device)
        replace_module(model, r["module"], head)
        if r.get("untied"):
            model.config.tie_word_embeddings = False

    def describe(self, model: nn.Module) -> list[str]:
        return [self._head(model)[0]]


__all__ = ["VQLogits", "VQLogitsHead", "smallest_int_dtype"]

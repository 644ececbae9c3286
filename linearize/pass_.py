"""The `linearize` pass: glue between recipes/checkpoints and the module swap (convert.py).

It changes no weights: the converted layers compute with the same projections, so the state dict keeps its names
and shapes and `restore` only redoes the swap before the weights load. Variants gla and hybrid add no parameters;
mom adds a small router and beta map per layer (saved with the checkpoint, created again by `restore`). Quality
is recovered afterwards by the `recover` pass (LoRA) in the same recipe."""
from __future__ import annotations

from pydantic import Field
from torch import nn

from ..models import checkpoint_dtype
from ..pass_api import Pass, PassConfig, PassContext, PassReport, tensor_bytes, timed
from ..registry import register_pass
from .convert import attention_modules, linearize_model
from .mom import round_new_parameters
from .settings import LayerSpecField, LinearizeSettings, resolve_layers

SETTINGS_FIELDS = tuple(LinearizeSettings.model_fields)


@register_pass("linearize")
class Linearize(Pass):
    """Softmax attention -> Liger gated linear attention (variant gla), Liger Attention (variant hybrid) or
    Mixture-of-Memories (variant mom: adds a router and a beta map per layer, trained by `recover`)."""

    class Config(PassConfig, LinearizeSettings, LayerSpecField):
        # `layers` picks the layers (all | [indices] | every_K); `targets`/`ignore` are not used to select
        targets: list[str] = Field(default_factory=lambda: ["re:.*self_attn"])
        ignore: list[str] = Field(default_factory=list)

    def settings(self) -> LinearizeSettings:
        return LinearizeSettings(**self.config.model_dump(include=set(SETTINGS_FIELDS)))

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        report = PassReport(name=self.name)
        with timed(report):
            report.bytes_before = tensor_bytes(model)
            params_before = sum(p.numel() for p in model.parameters())
            report.modules = linearize_model(model, self.settings(), self.config.layers)
            round_new_parameters(model, report.modules, checkpoint_dtype(model))
            report.bytes_after = tensor_bytes(model)
            total = len(attention_modules(model))
            new_parameters = sum(p.numel() for p in model.parameters()) - params_before
            report.details = {"changes_weights": False, "new_parameters": new_parameters,
                              "layers_linearized": len(report.modules), "layers_softmax": total - len(report.modules),
                              "variant": self.config.variant, "gate": self.config.gate}
        return report

    def restore(self, model: nn.Module, entry: dict) -> None:
        linearize_model(model, self.settings(), self.config.layers)

    def describe(self, model: nn.Module) -> list[str]:
        modules = attention_modules(model)
        return [modules[i][0] for i in resolve_layers(self.config.layers, len(modules))]

"""The `linearize` pass: glue between recipes/checkpoints and the module swap (convert.py).

It changes no weights: the converted layers compute with the same projections, so the state dict keeps its names
and shapes and `restore` only redoes the swap before the weights load. Variants gla and hybrid add no parameters;
mom adds a small router and beta map per layer (saved with the checkpoint, created again by `restore`). Quality
is recovered afterwards by the `recover` pass (LoRA) in the same recipe."""
from __future__ import annotations

from pydantic import Field
from torch import nn

from ..cache_choice import drop_unusable_cache_implementation, removed_note
from ..errors import ConfigError, UnsupportedModelError
from ..models import checkpoint_dtype, context_length
from ..pass_api import (Pass, PassConfig, PassContext, PassReport, left_by_earlier, restoring, tensor_bytes,
                        timed)
from ..registry import register_pass
from .attention import LinearizedAttention
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

    def validate_config(self) -> None:
        if restoring():  # a checkpoint an older version wrote: its record as it was
            return
        problem = self.settings().foreign_options()
        chosen = sorted({"targets", "ignore"} & self.config.model_fields_set)
        if chosen and not problem:  # said, not ignored: every layer was linearized whatever they named
            problem = (f"linearize picks its layers with `layers:` (all, a list of indices, or every_K), not with "
                       f"`{'`/`'.join(chosen)}`: remove {'them' if len(chosen) > 1 else 'it'} and use `layers`")
        if problem:
            raise ConfigError(problem)

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
        reach = self._longer_than_the_sliding_window(model)
        if reach:
            report.notes.append(reach)
        named = drop_unusable_cache_implementation(model)
        if named:
            report.notes.append(removed_note(named, "linearized layers cannot use (a static cache has no recurrent "
                                                    "state), so generate uses a dynamic cache"))
        if getattr(model, "kv_cache_settings", None) is not None:  # an earlier gear_kv counted these layers
            report.notes.append(f"{len(report.modules)} layer(s) the earlier gear_kv pass compresses are linearized "
                                "now: their cache slots hold recurrent states (gear_kv's layer count is from before)")
        return report

    def _longer_than_the_sliding_window(self, model: nn.Module) -> str | None:
        """A note where the hybrid's window branch reaches further back than the sliding-window attention it replaces
        (the recurrent branch reaches back without limit in every variant: that is the point)."""
        from ..kvcache.cache import sliding_windows

        if self.config.variant != "hybrid":
            return None
        sliding = sliding_windows(model.config)
        modules = attention_modules(model)
        longer = [i for i in resolve_layers(self.config.layers, len(modules), strict=False)
                  if i in sliding and self.config.window > sliding[i]]
        if not longer:
            return None
        smallest = min(sliding[i] for i in longer)
        return (f"layer(s) {longer} attended through a sliding window of {smallest} tokens; the hybrid's window "
                f"branch sees {self.config.window} (`window: {smallest}` keeps the original reach)")

    def restore(self, model: nn.Module, entry: dict) -> None:
        linearize_model(model, self.settings(), self.config.layers, strict=False)

    def describe(self, model: nn.Module) -> list[str]:
        modules = attention_modules(model)
        return [modules[i][0] for i in resolve_layers(self.config.layers, len(modules))]

    def check(self, model: nn.Module) -> None:
        """A model that is linearized already (a linearized checkpoint as the input) at the chosen layers; a hybrid
        window longer than the model's context."""
        done = [name for name in self.describe(model) if isinstance(model.get_submodule(name), LinearizedAttention)]
        if done:
            raise UnsupportedModelError(f"{done[0]} is already linearized (the input model is a linearized "
                                        "checkpoint); choose other `layers` or start from the original model")
        head_dim = next(iter(attention_modules(model).values()))[1].head_dim if self.config.gate == "gsa" else None
        if head_dim is not None and self.config.num_slots > head_dim:
            # the slots pool the head dimension's gates into groups: beyond one dimension a slot, slots repeat
            # others (the same outputs for more state)
            raise ConfigError(f"linearize: num_slots {self.config.num_slots} is more than the head dimension "
                              f"({head_dim}): each slot pools at least one dimension's gate; use at most {head_dim}")
        context = context_length(model.config)
        window = self.config.window_or_none()
        if window is not None and context is not None and window > context:
            # the window's ring buffer is sized for `window` tokens at the first call (615 MB for 100,000 on the
            # tiny model) while no sequence reaches past the context
            raise ConfigError(f"linearize: window {window} is longer than the model's context ({context} tokens): "
                              f"the softmax branch would hold a buffer for tokens no input reaches; use at most "
                              f"{context} (Liger: 64)")

    def check_after(self, model: nn.Module, earlier) -> None:
        """Two linearize passes may convert different layers (e.g. GLA here, the hybrid there), not the same; and a
        compressed KV cache (an earlier gear_kv, or the model's) must keep a softmax layer to compress."""
        mine = set(self.describe(model))
        for p in earlier:
            if p.name == self.name:
                both = [name for name in p.describe(model) if name in mine]
                if both:
                    raise ConfigError(f"the linearize pass before this one converts {both[0]} too"
                                      f"{f' (and {len(both) - 1} more)' if len(both) > 1 else ''}: give the two "
                                      "passes disjoint `layers`")
        compressed = self._compressed_cache_layers(model, earlier)
        if compressed and not left_by_earlier(model, compressed - mine, earlier, lambda p: p.name == self.name):
            # gear_kv then linearize-all wrote a "KIVI-2" cache compressing nothing (its eval: KL 0, as if lossless);
            # the other order is refused by gear_kv's own check
            raise ConfigError("linearize converts every attention layer the compressed KV cache (gear_kv) would "
                              "compress, so it would compress nothing: drop gear_kv, or linearize only some layers "
                              "(layers: every_K)")

    @staticmethod
    def _compressed_cache_layers(model: nn.Module, earlier) -> set[str]:
        """The softmax attention modules a compressed KV cache compresses: an earlier gear_kv pass's, or (a model
        loaded with one) all but its skip_layers; those linearized already excluded."""
        modules = attention_modules(model)
        gear = [p for p in earlier if p.name == "gear_kv"]
        settings = getattr(model, "kv_cache_settings", None)
        if gear:
            names = set().union(*(p.describe(model) for p in gear))
        elif settings is not None:
            names = {name for i, (name, _) in modules.items() if i not in settings.skip_layers}
        else:
            return set()
        return {name for _, (name, module) in modules.items()
                if name in names and not isinstance(module, LinearizedAttention)}


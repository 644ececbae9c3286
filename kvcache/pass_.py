"""The `gear_kv` pass: glue between recipes/checkpoints and the compressed KV cache (cache.py).

It changes no weights. It validates the cache settings against the model, records them in the checkpoint's
`compression` section, and installs the cache on the model: the "gear_kv" attention implementation (which reads the
compressed storage) and a `generate` that builds a `GEARCache` with these settings whenever the caller passes no
cache of their own. `restore` installs it again on a reloaded model, so `compress.load(...)` + `generate` and
`compress generate` use the compressed cache by default."""
from __future__ import annotations

import warnings

from pydantic import Field
from torch import nn

from ..cache_choice import drop_unusable_cache_implementation, removed_note
from ..errors import ConfigError, UnsupportedModelError
from ..models import text_config
from .quality import residual_beyond_context
from ..kernels.kv_pages import FORMAT_VERSION as KV_FORMAT_VERSION
from ..pass_api import Pass, PassConfig, PassContext, PassReport, left_by_earlier, tensor_bytes, timed
from ..registry import register_pass
from .attention import use_compressed_attention
from .cache import GEARCache
from .config import KVCacheSettings

SETTINGS_FIELDS = tuple(KVCacheSettings.model_fields)
_LINEARIZED = "linearized: a recurrent state, no KV cache"  # why a layer is left out (report, --dry-run)


@register_pass("gear_kv")
class GearKV(Pass):
    """Compressed KV cache for generation: GEAR (method: gear) or KIVI (method: kivi)."""

    once_per_model = True  # one KV cache per model: a second gear_kv would replace the first

    supports_offload = True  # records cache settings, touches no weights (see Pass.supports_offload)

    class Config(PassConfig, KVCacheSettings):
        # the layers whose attention modules `targets`/`ignore` leave out keep an uncompressed cache, as do
        # `skip_layers` (the two ways of picking layers add up)
        targets: list[str] = Field(default_factory=lambda: ["re:.*self_attn"],
                                   description="attention modules whose layers get the compressed cache")
        ignore: list[str] = Field(default_factory=list, description="attention modules whose layers keep an "
                                  "uncompressed cache (like skip_layers)")

    def settings(self, model: nn.Module | None = None) -> KVCacheSettings:
        """The cache settings; given the model (a new run), the layers `targets`/`ignore` leave out are skipped too.
        They only named modules once, and the cache compressed every layer whatever they said: the record keeps
        the layers skipped as `skip_layers` (`entry`), so a checkpoint restores with `settings()` alone, an older
        one as it was measured."""
        fields = self.config.model_dump(include=set(SETTINGS_FIELDS))
        if model is not None:
            fields["skip_layers"] = sorted(set(fields["skip_layers"]) | self.layers_left_out(model))
        return KVCacheSettings(**fields)

    def layers_left_out(self, model: nn.Module) -> set[int]:
        """Layer indices whose attention module `targets`/`ignore` do not select."""
        chosen = self.target_modules(model)
        stray = [n for n, m in chosen.items() if not isinstance(getattr(m, "layer_idx", None), int)]
        if stray:
            raise ConfigError(f"gear_kv: targets match {stray[:3]}, which have no layer_idx (not a decoder layer's "
                              "attention): the cache compresses attention layers' keys and values, so target the "
                              "self_attn modules")
        layers = text_config(model.config).num_hidden_layers
        return set(range(layers)) - {m.layer_idx for m in chosen.values()}

    def taken_by(self, earlier: Pass, model: nn.Module) -> str | None:
        return _LINEARIZED if earlier.name == "linearize" else None

    def check_after(self, model: nn.Module, earlier) -> None:
        """When earlier linearize passes convert every attention layer, no KV cache is left to compress: said
        before any work instead of a report of layers 'compressed' that hold no cache."""
        from ..linearize import LinearizedAttention

        described = self.describe(model)
        if not described and self.target_modules(model):
            raise ConfigError(f"gear_kv: skip_layers {sorted(self.config.skip_layers)} with targets/ignore leave no "
                              "attention layer to compress; select more layers, or drop gear_kv")
        listed = {n for n in described  # a model loaded linearized counts as well
                  if not isinstance(model.get_submodule(n), LinearizedAttention)}
        if not left_by_earlier(model, listed, earlier, lambda p: self.taken_by(p, model)):
            raise ConfigError("gear_kv: every attention layer is linearized (by an earlier pass or in the model "
                              "loaded), so no layer keeps a KV cache to compress: drop gear_kv, or linearize only "
                              "some layers (layers: every_K)")

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        report = PassReport(name=self.name)
        with timed(report):
            settings = self.settings(model)
            cache = install_compressed_cache(model, settings)  # validates against the model's shapes
            listed = self.describe(model)
            # a linearized layer keeps a recurrent state, no key/value cache: nothing of it is compressed
            from ..linearize import LinearizedAttention

            report.skipped = {n: _LINEARIZED for n in listed
                              if isinstance(model.get_submodule(n), LinearizedAttention)}
            report.modules = [n for n in listed if n not in report.skipped]
            report.bytes_before = report.bytes_after = tensor_bytes(model)
            report.details = {"changes_weights": False, "layers_compressed": len(report.modules),
                              "layers_skipped": sorted(settings.skip_layers), "cache": type(cache).__name__,
                              "kv_storage_format": KV_FORMAT_VERSION}
        named = drop_unusable_cache_implementation(model)
        if named:
            report.notes.append(removed_note(named, "the compressed cache replaces"))
        return report

    def restore(self, model: nn.Module, entry: dict) -> None:
        install_compressed_cache(model, self.settings())  # the record's skip_layers hold what targets left out

    def entry_as_held(self, model: nn.Module, entry: dict) -> dict:
        """The cache settings the model generates with now (set in memory after the pass, they were saved as the
        pass's arguments, and the reload generated with those)."""
        held = getattr(model, "kv_cache_settings", None)
        if held is None:
            return entry
        return {**entry, "args": {**(entry.get("args") or {}), **held.model_dump(mode="json")}}

    def entry(self, report: PassReport | None = None) -> dict:
        out = super().entry(report)
        if report is not None and "layers_skipped" in report.details:
            out["args"]["skip_layers"] = report.details["layers_skipped"]
        return out

    def check(self, model: nn.Module) -> None:
        existing = getattr(model, "kv_cache_settings", None)
        if existing is not None:  # a second gear_kv (an earlier apply, or the checkpoint loaded) would replace it
            raise ConfigError(f"gear_kv: the model already has a compressed KV cache ({existing.method}, "
                              f"{existing.bits} bits); apply gear_kv to the model without one")
        settings = self.settings(model)
        try:
            GEARCache(model.config, settings)  # validates the settings against head_dim and the layer count
        except ConfigError as exc:
            left_out = sorted(set(settings.skip_layers) - set(self.config.skip_layers))
            if left_out and "skip_layers" in str(exc):  # the user wrote targets/ignore, not those skip_layers
                raise ConfigError(f"gear_kv: targets/ignore leave layers {left_out} uncompressed (as skip_layers "
                                  f"would), and then: {exc}") from None
            raise
        problem = residual_beyond_context(self.config.residual_length, model.config)
        if problem:
            raise ConfigError(problem)

    def describe(self, model: nn.Module) -> list[str]:
        skipped = set(self.config.skip_layers)
        return [n for n, m in self.target_modules(model).items() if getattr(m, "layer_idx", None) not in skipped]


def install_compressed_cache(model: nn.Module, settings: KVCacheSettings) -> GEARCache:
    """Make `model.generate` default to a GEARCache with `settings`, read through the "gear_kv" attention.
    Returns an example cache (validates the settings against the model's shapes; raises ConfigError)."""
    if not hasattr(model, "generate") or not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(f"{type(model).__name__} has no generate/attention interface: gear_kv needs a "
                                    "transformers causal LM (Llama, Mistral, Qwen2/3)")
    example = GEARCache(model.config, settings)
    use_compressed_attention(model)
    model.generate = GenerateWithCompressedCache(model)
    model.kv_cache_settings = settings
    return example


class GenerateWithCompressedCache:
    """`model.generate` that builds a GEARCache with `model.kv_cache_settings` unless the caller (or the generation
    config) asks for no cache, or the caller passes its own or names a cache implementation (one named by the
    model's own generation_config is replaced, with a warning).

    An object holding the model, not a closure (deepcopy would keep generating with the original) nor a bound method
    (pickle stores that as getattr(model, "..."), which fails when loading, before the model's state exists):
    deepcopy and pickle carry this reference along with the model they copy."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # help(model.generate) shows transformers' documentation (the keyword arguments are generate's own); not
        # functools.update_wrapper, whose __wrapped__ (a decorated function) does not pickle
        self.__name__, self.__doc__ = "generate", type(model).generate.__doc__

    def __call__(self, *args, **kwargs):
        model = self.model
        gen_config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        wants_cache = kwargs.get("use_cache", getattr(gen_config, "use_cache", True)) is not False
        own = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        implementation = kwargs.get("cache_implementation",
                                    getattr(kwargs.get("generation_config"), "cache_implementation", None))
        own_config = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
        if implementation is None and own_config is not None and "cache_implementation" not in kwargs:
            # named by the checkpoint's generation_config.json (e.g. a source model's "static"), not by the caller:
            # the gear_kv pass chose this model's cache, so it stays (transformers fills a None from the model's
            # config and refuses a cache and an implementation at once; a keyword overrides both)
            kwargs["cache_implementation"] = None
            if wants_cache and not own:
                warnings.warn(f"this model's generation_config names cache_implementation={own_config!r}; its "
                              "gear_kv cache is used instead (pass cache_implementation= to generate to choose "
                              "another)", stacklevel=2)
        if wants_cache and not own and implementation is None:
            kwargs["cache"] = GEARCache(model.config, model.kv_cache_settings)
        return type(model).generate(model, *args, **kwargs)
